#!/usr/bin/env bash
# Network namespaces as "hosts" (root only), for make demo-hosts, make
# bench-nodes and the namespace test (tests/it/hosts.rs):
#
#   scripts/hosts-net.sh up TAG [N]   N hosts (default 3) joined by a bridge
#   scripts/hosts-net.sh down TAG     removes them (and whatever ran inside
#                                     loses its network; kill it first)
#
# Namespaces hoff-TAG-h1 .. hoff-TAG-hN are the hosts: each has eth0 with
# ${HOSTS_NET:-10.77.0}.I/24 (I = 1..N). hoff-TAG-hub holds the bridge br0
# (address .254, where clients and etcd run) and the far ends of the veth
# pairs (p1..pN). Nothing is made in the root namespace: runs with
# different TAGs never clash, even on the same addresses. A host is cut
# off with `ip -n hoff-TAG-hI link set eth0 down` (and back with `up`).
set -euo pipefail

NET=${HOSTS_NET:-10.77.0}

usage() {
  echo "usage: $0 up TAG [N] | down TAG" >&2
  exit 2
}

up() {
  local tag=$1 n=$2 hub="hoff-$1-hub"
  ip netns add "$hub"
  ip -n "$hub" link set lo up
  ip -n "$hub" link add br0 type bridge
  ip -n "$hub" addr add "$NET.254/24" dev br0
  ip -n "$hub" link set br0 up
  for i in $(seq "$n"); do
    local h="hoff-$tag-h$i"
    ip netns add "$h"
    ip -n "$h" link set lo up
    # Made in the hub, its peer moved straight into the host.
    ip -n "$hub" link add "p$i" type veth peer name eth0 netns "$h"
    ip -n "$hub" link set "p$i" master br0 up
    ip -n "$h" addr add "$NET.$i/24" dev eth0
    ip -n "$h" link set eth0 up
  done
  # The bridge (no STP) forwards as soon as a port has carrier: wait for
  # every port to say so (a few ms).
  for i in $(seq "$n"); do
    for _ in $(seq 100); do
      bridge -n "$hub" link show dev "p$i" | grep -q "state forwarding" && break
      sleep 0.02
    done
    bridge -n "$hub" link show dev "p$i" | grep -q "state forwarding" || return 1
  done
}

down() {
  local tag=$1
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^hoff-$tag-(hub|h[0-9]+)$" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

[ $# -ge 2 ] || usage
case $1 in
  up)
    n=${3:-3}
    [[ $2 =~ ^[a-z0-9]{1,12}$ ]] || { echo "$0: TAG is 1 to 12 of [a-z0-9]" >&2; exit 2; }
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || { echo "$0: N is 1 to 200" >&2; exit 2; }
    if ! up "$2" "$n"; then
      down "$2"
      echo "$0: could not set up the namespaces (root, and ip netns, needed)" >&2
      exit 1
    fi
    ;;
  down) down "$2" ;;
  *) usage ;;
esac
