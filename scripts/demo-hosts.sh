#!/usr/bin/env bash
# make demo-hosts (as root): three hosts in network namespaces, joined by
# veth pairs and a bridge (scripts/hosts-net.sh), each with its own address
# (10.77.0.1-3; HOSTS_NET=10.0.9 picks another /24). Starts one etcd in the
# bridge's namespace (10.77.0.254:2379) and one node per host (A, B, C,
# 2 workers each, bound to the host's address); relays from every worker to
# every worker; prints each node's link table. Everything it made
# (processes, namespaces, veths, the bridge) is removed on exit, even on
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=SCRIPTDIR/hosts-lib.sh
source scripts/hosts-lib.sh
BIN=${BIN:-$PWD/target/release/handoff}
[ -x "$BIN" ] || { echo "no $BIN: make build first" >&2; exit 1; }
hosts_check
command -v etcd >/dev/null || { echo "needs etcd: apt-get install etcd-server" >&2; exit 1; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/handoff-hosts.XXXXXX")
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 80); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    hosts_down
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for FILE REGEX WHAT PID: waits (15 s) for a line in FILE.
wait_for() {
    for _ in $(seq 300); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || break
        sleep 0.05
    done
    echo "$3 did not start; its log:" >&2
    tail -n 20 "$1" "${1%.out}.err" >&2 2>/dev/null || true
    exit 1
}

hosts_up
echo "== hosts: namespaces $(hosts_ns 1) $(hosts_ns 2) $(hosts_ns 3), bridge br0 in $(hosts_ns hub)"
for i in 1 2 3; do
    ip -n "$(hosts_ns "$i")" -br addr show dev eth0
done

ETCD_URL=http://$HOSTS_NET.254:2379
# Started directly (not through a shell function): $! is etcd itself.
ip netns exec "$(hosts_ns hub)" etcd --name demo --data-dir "$TMP/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster demo=http://127.0.0.1:2380 >"$TMP/etcd.out" 2>"$TMP/etcd.err" &
pids+=($!)
for _ in $(seq 200); do
    hosts_in_hub curl -sf "$ETCD_URL/health" >/dev/null 2>&1 && break
    sleep 0.05
done
hosts_in_hub curl -sf "$ETCD_URL/health" >/dev/null || { echo "etcd did not start" >&2; tail "$TMP/etcd.err" >&2; exit 1; }
echo "== etcd at $ETCD_URL (in $(hosts_ns hub))"

for i in 1 2 3; do
    n=${HOSTS_NAMES[i - 1]}
    hosts_node_cmd "$i" "$BIN" "$TMP/$n" 2 etcd
    "${HOSTS_CMD[@]}" --connect-timeout 1 --heartbeat 0.5 >"$TMP/$n.out" 2>"$TMP/$n.err" &
    pids+=($!)
    wait_for "$TMP/$n.out" '^ready' "node $n" "$!"
    echo "== node $n on $(hosts_addr "$i"):$HOSTS_PORT ($(hosts_ns "$i"))"
done

# Each node learns the others from etcd's watch (within milliseconds).
for n in "${HOSTS_NAMES[@]}"; do
    for _ in $(seq 200); do
        seen=$("$BIN" status --dir "$TMP/$n" --json | grep -o '"source"' | wc -l)
        [ "$seen" = "${#HOSTS_NAMES[@]}" ] && break
        sleep 0.05
    done
    [ "$seen" = "${#HOSTS_NAMES[@]}" ] || { echo "node $n sees $seen of ${#HOSTS_NAMES[@]} nodes in etcd" >&2; exit 1; }
done
echo "== etcd: every node sees the ${#HOSTS_NAMES[@]} nodes"

echo "== relays: from each node's workers (2 client connections land on both) to every worker of every node"
for i in 1 2 3; do
    for m in "${HOSTS_NAMES[@]}"; do
        for w in 0 1; do
            printf '%s -> %s:%s  ' "${HOSTS_NAMES[i - 1]}" "$m" "$w"
            hosts_in_hub "$BIN" client rpc --host "$(hosts_addr "$i")" --port "$HOSTS_PORT" \
                --conns 2 --requests 100 --relay "$m:$w"
        done
    done
done
for n in "${HOSTS_NAMES[@]}"; do
    echo "== node $n"
    "$BIN" status --dir "$TMP/$n"
done
