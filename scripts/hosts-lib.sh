# shellcheck shell=bash
# Three "hosts" in network namespaces, each running one handoff node:
# shared by make demo-hosts (scripts/demo-hosts.sh) and make bench-nodes
# (its 3-host row). Sourced, not run; needs root and iproute2. The network
# itself is scripts/hosts-net.sh (also used by tests/it/hosts.rs): hosts
# hoff-TAG-h1..h3 at $HOSTS_NET.1-3, the bridge and the clients in
# hoff-TAG-hub at $HOSTS_NET.254.
HOSTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS_NET=${HOSTS_NET:-10.77.0}
export HOSTS_NET
# Every node listens on this port of its own address: each namespace is
# private to this run, so a fixed port cannot clash with anything.
HOSTS_PORT=${HOSTS_PORT:-7300}
HOSTS_NAMES=(A B C)
HOSTS_TAG=""

# hosts_check: fails with a clear message unless namespaces can be made.
hosts_check() {
    if [ "$(id -u)" != 0 ]; then
        echo "needs root (network namespaces): run it as root, e.g. sudo make demo-hosts" >&2
        return 1
    fi
    command -v ip >/dev/null || { echo "needs iproute2 (ip): make deps" >&2; return 1; }
}

# hosts_up: makes the 3 hosts under a fresh random tag (HOSTS_TAG).
hosts_up() {
    HOSTS_TAG=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    "$HOSTS_DIR/hosts-net.sh" up "$HOSTS_TAG" "${#HOSTS_NAMES[@]}"
}

# hosts_down: removes them (kill what runs inside first).
hosts_down() {
    [ -z "$HOSTS_TAG" ] || "$HOSTS_DIR/hosts-net.sh" down "$HOSTS_TAG"
}

# hosts_ns I: host I's namespace (1-based; "hub" for the hub).
hosts_ns() { echo "hoff-$HOSTS_TAG-$([ "$1" = hub ] && echo hub || echo "h$1")"; }

# hosts_addr I: host I's address (1-based).
hosts_addr() { echo "$HOSTS_NET.$1"; }

# hosts_node_cmd I BIN DIR WORKERS [etcd]: sets HOSTS_CMD to the command that
# runs node ${HOSTS_NAMES[I-1]} on host I, bound to its own address (append
# flags to it). It knows every other host as a peer (--peers); with "etcd",
# it finds them instead through the etcd at http://$HOSTS_NET.254:2379
# (which the caller runs), registering its own address (--advertise).
hosts_node_cmd() {
    local i=$1 bin=$2 dir=$3 workers=$4 j peers=""
    for ((j = 1; j <= ${#HOSTS_NAMES[@]}; j++)); do
        [ "$j" = "$i" ] || peers="$peers${peers:+,}${HOSTS_NAMES[j - 1]}=$(hosts_addr "$j"):$HOSTS_PORT"
    done
    HOSTS_CMD=(ip netns exec "$(hosts_ns "$i")" "$bin" node --name "${HOSTS_NAMES[i - 1]}"
        --host "$(hosts_addr "$i")" --port "$HOSTS_PORT" --workers "$workers" --dir "$dir")
    if [ "${5:-}" = etcd ]; then
        HOSTS_CMD+=(--etcd "http://$HOSTS_NET.254:2379" --advertise "$(hosts_addr "$i"):$HOSTS_PORT")
    else
        HOSTS_CMD+=(--peers "$peers")
    fi
}

# hosts_in_hub CMD...: runs CMD in the hub (it reaches every host); in the
# foreground (a background function's $! would be a subshell, not CMD).
hosts_in_hub() { ip netns exec "$(hosts_ns hub)" "$@"; }
