#!/usr/bin/env bash
# make bench-cluster: the cluster (2 workers) under each policy
# (round-robin, least-conn, shared) against Node's cluster module
# (bench/node_cluster.js, SCHED_RR), all driven by the same Rust load client:
#   short connections  rpc --short --conns 16 --requests 500  -> connections/s
#   keep-alive         rpc --conns 100 --requests 3000        -> requests/s (about 3 s: Node varies run to run)
# each RUNS times (default 3), the servers taken in turn; medians. Then the
# memory per idle connection for round-robin and Node: IDLE_CONNS (10000)
# idle connections opened by bench/idle_conns.py, summed VmRSS of master +
# workers after minus before, divided by IDLE_CONNS. Prints a Markdown table
# (each row the median run by throughput: its conn/s or req/s, p50, p99) and
# the ratios against Node (targets: short >= 2, keep-alive >= 1.3). Then
# TCP against a Unix socket: one round-robin cluster listening on both
# (--port P --listen unix:PATH), the same keep-alive load over each in turn
# (rpc --port P / rpc --unix PATH), RUNS times each; target: Unix >= 1.2x TCP
# req/s. Writes bench/results/bench-cluster.{md,svg,tsv} and exits 1 when a
# target is missed. Any run with an error fails the script. Then handoff
# round-robin against the C yardstick (bench/cluster_epoll.c, build/
# cluster_epoll): keep-alive rpc --conns 100 --requests 1000, RUNS times
# each, taken in turn; target: handoff >= 1.0x the C req/s.
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

IDLE_CONNS=${IDLE_CONNS:-10000}
WORKERS=2
CBIN=$ROOT/build/cluster_epoll
need_bin "$BIN" "$CBIN"
declare -A YARD_PID
need_plot

need_node

# Every server inherits the raised descriptor limit: the idle connections
# need IDLE_CONNS descriptors in the opener and in the servers.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"
((hard >= IDLE_CONNS + 500)) \
    || die "ulimit -n is at most $hard, too low for $IDLE_CONNS idle connections (set IDLE_CONNS lower or raise the hard limit)"

IMPLS=(round-robin least-conn shared node)
declare -A NAME=([round-robin]="handoff round-robin" [least-conn]="handoff least-conn"
                 [shared]="handoff shared" [node]="Node cluster (SCHED_RR)")
declare -A PORT MASTER DIR

# start_server IMPL TAG: a master with $WORKERS workers on a free port.
start_server() {
    local impl=$1 tag=$2 p
    p=$(free_port)
    if [ "$impl" = node ]; then
        bg_start "$tag" "$NODE" "$ROOT/bench/node_cluster.js" "$p" "$WORKERS"
    else
        DIR[$tag]=$BENCH_TMP/$tag-dir
        bg_start "$tag" "$BIN" cluster --port "$p" --workers "$WORKERS" --dir "${DIR[$tag]}" --policy "$impl"
    fi
    wait_ready "$tag" "$BG_PID"
    PORT[$tag]=$p
    MASTER[$tag]=$BG_PID
    say "${NAME[$impl]}: port $p ready (master pid $BG_PID)"
}

# status_json TAG: the handoff master's status, or fail.
status_json() {
    timeout 10 "$BIN" status --dir "${DIR[$1]}" --json 2>>"$BENCH_TMP/status.err" \
        || die "handoff status --dir ${DIR[$1]} failed: $(tail -n 3 "$BENCH_TMP/status.err")"
}
# status_get TAG EXPR: evaluates EXPR (Python, v = the status JSON).
status_get() { status_json "$1" | python3 -c "import json, sys; v = json.load(sys.stdin); print($2)"; }

# worker_pids IMPL TAG
worker_pids() {
    if [ "$2" = node ] || [ "$1" = node ]; then
        pgrep -P "${MASTER[$2]}" | tr '\n' ' '
    else
        status_get "$2" '" ".join(str(w["pid"]) for w in v["workers"])'
    fi
}

# accepted IMPL TAG WORKER_PIDS: connections the workers hold — the open
# count in handoff's status; socket descriptors of Node's workers.
accepted() {
    if [ "$1" = node ]; then
        # shellcheck disable=SC2086
        socket_fds $3
    else
        status_get "$2" 'sum(w["open"] for w in v["workers"])'
    fi
}

# wait_until SECONDS CMD...: polls CMD until it succeeds (1 if it never does).
wait_until() {
    local secs=$1 deadline
    shift
    deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------------- throughput
say "bench-cluster: $RUNS runs per load, $WORKERS workers; raw client lines follow"
for impl in "${IMPLS[@]}"; do start_server "$impl" "$impl"; done
for impl in "${IMPLS[@]}"; do
    load "warm-up ${NAME[$impl]}" rpc --port "${PORT[$impl]}" --conns 10 --requests 200
    load "warm-up ${NAME[$impl]}" rpc --port "${PORT[$impl]}" --conns 4 --requests 50 --short
done

declare -A RES   # RES[impl,load,metric] = space-separated values, one per run
for ((run = 1; run <= RUNS; run++)); do
    if ((run % 2)); then order=("${IMPLS[@]}"); else order=(node shared least-conn round-robin); fi
    for impl in "${order[@]}"; do
        load "run $run ${NAME[$impl]} short" rpc --port "${PORT[$impl]}" --conns 16 --requests 500 --short
        for m in rps p50_us p99_us; do RES[$impl,short,$m]+="$(field "$LOAD_LINE" "$m") "; done
        plot_point "short connections: conn/s" "short" "${NAME[$impl]}" "$(field "$LOAD_LINE" rps)"
        plot_point "p99 µs" "short" "${NAME[$impl]}" "$(field "$LOAD_LINE" p99_us)"
        load "run $run ${NAME[$impl]} keep-alive" rpc --port "${PORT[$impl]}" --conns 100 --requests 3000
        for m in rps p50_us p99_us; do RES[$impl,keep,$m]+="$(field "$LOAD_LINE" "$m") "; done
        plot_point "keep-alive: req/s" "keep-alive" "${NAME[$impl]}" "$(field "$LOAD_LINE" rps)"
        plot_point "p99 µs" "keep-alive" "${NAME[$impl]}" "$(field "$LOAD_LINE" p99_us)"
    done
done
for impl in "${IMPLS[@]}"; do bg_forget_stop "${MASTER[$impl]}"; done

# ------------------------------------------------------- TCP vs Unix socket
# One round-robin cluster with a TCP and a Unix listener: the keep-alive
# load over each, taken in turn (the order swapped every run). Without
# `cluster --listen` (a binary from before Unix listeners) the rows stay
# empty and the target counts as missed.
VIAS=(tcp unix)
declare -A VIA_NAME=([tcp]="TCP 127.0.0.1" [unix]="Unix socket")
UNIX_SKIP=""
if "$BIN" cluster --help 2>/dev/null | grep -q -- '--listen'; then
    tag=tcp-unix
    UNIX_SOCK=$BENCH_TMP/rr.sock
    p=$(free_port)
    DIR[$tag]=$BENCH_TMP/$tag-dir
    bg_start "$tag" "$BIN" cluster --port "$p" --listen "unix:$UNIX_SOCK" --workers "$WORKERS" \
        --dir "${DIR[$tag]}" --policy round-robin
    wait_ready "$tag" "$BG_PID"
    [ -S "$UNIX_SOCK" ] || die "handoff cluster --listen unix:$UNIX_SOCK: ready, but no socket at $UNIX_SOCK"
    say "handoff round-robin: port $p and unix:$UNIX_SOCK ready (master pid $BG_PID)"
    declare -A TO=([tcp]="--port $p" [unix]="--unix $UNIX_SOCK")
    for via in "${VIAS[@]}"; do
        # shellcheck disable=SC2086
        load "warm-up round-robin over ${VIA_NAME[$via]}" rpc ${TO[$via]} --conns 10 --requests 200
    done
    for ((run = 1; run <= RUNS; run++)); do
        if ((run % 2)); then order=(tcp unix); else order=(unix tcp); fi
        for via in "${order[@]}"; do
            # shellcheck disable=SC2086
            load "run $run round-robin keep-alive over ${VIA_NAME[$via]}" rpc ${TO[$via]} --conns 100 --requests 3000
            for m in rps p50_us p99_us; do RES[$via,keep,$m]+="$(field "$LOAD_LINE" "$m") "; done
            plot_point "keep-alive over TCP / Unix socket: req/s" "${VIA_NAME[$via]}" "${NAME[round-robin]}" "$(field "$LOAD_LINE" rps)"
        done
    done
    bg_forget_stop "$BG_PID"
else
    UNIX_SKIP="$BIN cluster has no --listen (Unix listeners): no Unix rows"
    say "bench: WARNING: $UNIX_SKIP"
fi

# ------------------------------------------------- against the C yardstick
# handoff round-robin against bench/cluster_epoll.c (2 forked epoll workers
# on SO_REUSEPORT listeners, the rpc ping answered as text), both up at
# once, the keep-alive load taken in turn (the order swapped every run).
# Target: handoff >= 1.0x the C req/s.
YARD=(handoff c)
declare -A YARD_NAME=([handoff]="handoff round-robin" [c]="C epoll cluster (bench/cluster_epoll.c)") YARD_PORT
for y in "${YARD[@]}"; do
    p=$(free_port)
    if [ "$y" = c ]; then
        bg_start yard-c "$CBIN" "$p" "$WORKERS"
    else
        DIR[yard-handoff]=$BENCH_TMP/yard-handoff-dir
        bg_start yard-handoff "$BIN" cluster --port "$p" --workers "$WORKERS" --dir "${DIR[yard-handoff]}" --policy round-robin
    fi
    wait_ready "yard-$y" "$BG_PID"
    YARD_PORT[$y]=$p
    YARD_PID[$y]=$BG_PID
    say "${YARD_NAME[$y]}: port $p ready (pid $BG_PID)"
    load "warm-up ${YARD_NAME[$y]}" rpc --port "$p" --conns 10 --requests 200
done
for ((run = 1; run <= RUNS; run++)); do
    if ((run % 2)); then order=(handoff c); else order=(c handoff); fi
    for y in "${order[@]}"; do
        load "run $run ${YARD_NAME[$y]} keep-alive 100x1000" rpc --port "${YARD_PORT[$y]}" --conns 100 --requests 1000
        for m in rps p50_us p99_us; do RES[yard-$y,keep,$m]+="$(field "$LOAD_LINE" "$m") "; done
        plot_point "keep-alive 100x1000 vs C yardstick: req/s" "100 x 1000" "${YARD_NAME[$y]}" "$(field "$LOAD_LINE" rps)"
    done
done
for y in "${YARD[@]}"; do bg_forget_stop "${YARD_PID[$y]}"; done

# ------------------------------------------------------------ idle memory
declare -A MEM MEMSPLIT NOTE
# The worker pid lists are split on purpose; the eval strings are expanded
# each time they are polled.
# shellcheck disable=SC2086,SC2016
idle_memory() {
    local impl=$1 tag=mem-$1 workers base base_fds before after master_b master_a per opener got
    start_server "$impl" "$tag"
    load "warm-up ${NAME[$impl]}" rpc --port "${PORT[$tag]}" --conns 10 --requests 200
    load "warm-up ${NAME[$impl]}" rpc --port "${PORT[$tag]}" --conns 4 --requests 50 --short
    workers=$(worker_pids "$impl" "$tag")
    [ -n "${workers// /}" ] || die "${NAME[$impl]}: no worker pids found"
    if [ "$impl" != node ]; then
        wait_until 10 eval '[ "$(accepted "$impl" "$tag")" = 0 ]' \
            || die "${NAME[$impl]}: warm-up connections still open after 10s"
    fi
    before=$(settled rss_kb "${MASTER[$tag]}" $workers)
    master_b=$(rss_kb "${MASTER[$tag]}")
    base=$(accepted "$impl" "$tag" "$workers")
    base_fds=$(socket_fds "${MASTER[$tag]}" $workers)

    bg_start "idle-$impl" python3 "$ROOT/bench/idle_conns.py" "${PORT[$tag]}" "$IDLE_CONNS"
    opener=$BG_PID
    wait_line "idle-$impl" "$opener" '^open ' 120
    wait_until 30 eval '(( $(accepted "$impl" "$tag" "$workers") - base >= IDLE_CONNS ))' \
        || die "${NAME[$impl]}: only $(( $(accepted "$impl" "$tag" "$workers") - base )) of $IDLE_CONNS idle connections accepted after 30s"
    after=$(settled rss_kb "${MASTER[$tag]}" $workers)
    master_a=$(rss_kb "${MASTER[$tag]}")
    got=$(grep -c '^closed' "$BENCH_TMP/idle-$impl.out" || true)
    ((got == 0)) || say "bench: WARNING: ${NAME[$impl]} closed $got idle connections while measuring"
    per=$(awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
    MEM[$impl]=$per
    plot_point "idle memory: B/conn (one run)" "$IDLE_CONNS idle" "${NAME[$impl]}" "$per"
    MEMSPLIT[$impl]=$(awk -v a="$master_a" -v b="$master_b" -v n="$IDLE_CONNS" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
    say "  ${NAME[$impl]}: RSS ${before} kB -> ${after} kB with $IDLE_CONNS idle connections: $per B/conn (master ${master_b} -> ${master_a} kB)"

    # The connections must be released once the opener goes.
    bg_forget_stop "$opener"
    if wait_until 15 eval '(( $(accepted "$impl" "$tag" "$workers") <= base &&
                                         $(socket_fds "${MASTER[$tag]}" $workers) <= base_fds ))'; then
        NOTE[$impl]=""
        say "  ${NAME[$impl]}: all idle connections released; RSS now $(rss_kb "${MASTER[$tag]}" $workers) kB"
    else
        NOTE[$impl]="$(( $(accepted "$impl" "$tag" "$workers") - base )) connections ($(( $(socket_fds "${MASTER[$tag]}" $workers) - base_fds )) socket descriptors) still held 15 s after the clients closed"
        say "bench: WARNING: ${NAME[$impl]}: ${NOTE[$impl]}"
    fi
    bg_forget_stop "${MASTER[$tag]}"
}
idle_memory round-robin
idle_memory node

# ---------------------------------------------------------------- table
declare -A MR   # MR[impl,load]: the median run by throughput
for impl in "${IMPLS[@]}"; do
    for l in short keep; do MR[$impl,$l]=$(mrun "$impl" "$l"); done
done
if [ -z "$UNIX_SKIP" ]; then
    for via in "${VIAS[@]}"; do MR[$via,keep]=$(mrun "$via" keep); done
fi
for y in handoff c; do MR[yard-$y,keep]=$(mrun "yard-$y" keep); done
# mat IMPL LOAD METRIC: METRIC of the median run.
mat() { at "$1" "$2" "$3" "${MR[$1,$2]}"; }

report() {
machine_line
echo
echo "| server ($WORKERS workers) | short conn/s | p50 µs | p99 µs | keep-alive req/s | p50 µs | p99 µs | idle B/conn |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for impl in "${IMPLS[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "${NAME[$impl]}" \
        "$(int "$(mat "$impl" short rps)")" "$(int "$(mat "$impl" short p50_us)")" "$(int "$(mat "$impl" short p99_us)")" \
        "$(int "$(mat "$impl" keep rps)")" "$(int "$(mat "$impl" keep p50_us)")" "$(int "$(mat "$impl" keep p99_us)")" \
        "${MEM[$impl]:-—}"
done
echo
echo "| vs Node | short conn/s | target | | keep-alive req/s | target | |"
echo "| --- | ---: | ---: | --- | ---: | ---: | --- |"
for impl in round-robin least-conn shared; do
    s=$(ratio "$(mat "$impl" short rps)" "$(mat node short rps)")
    k=$(ratio "$(mat "$impl" keep rps)" "$(mat node keep rps)")
    echo "| ${NAME[$impl]} | $s | ≥ 2 | $(verdict "$s" '>=' 2 "${NAME[$impl]} / Node short conn/s") | $k | ≥ 1.3 | $(verdict "$k" '>=' 1.3 "${NAME[$impl]} / Node keep-alive req/s") |"
done
echo
echo "| handoff round-robin ($WORKERS workers), keep-alive | req/s | p50 µs | p99 µs |"
echo "| --- | ---: | ---: | ---: |"
for via in "${VIAS[@]}"; do
    if [ -z "$UNIX_SKIP" ]; then
        printf '| over %s | %s | %s | %s |\n' "${VIA_NAME[$via]}" "$(int "$(mat "$via" keep rps)")" \
            "$(int "$(mat "$via" keep p50_us)")" "$(int "$(mat "$via" keep p99_us)")"
    else
        printf '| over %s | — | — | — |\n' "${VIA_NAME[$via]}"
    fi
done
echo
u=n/a
[ -n "$UNIX_SKIP" ] || u=$(ratio "$(mat unix keep rps)" "$(mat tcp keep rps)")
echo "| Unix vs TCP | keep-alive req/s | target | |"
echo "| --- | ---: | ---: | --- |"
echo "| ${NAME[round-robin]} | $u | ≥ 1.2 | $(verdict "$u" '>=' 1.2 "${NAME[round-robin]} Unix socket / TCP keep-alive req/s") |"
[ -z "$UNIX_SKIP" ] || echo "($UNIX_SKIP.)"
echo
echo "| keep-alive 100 conns × 1000 requests ($WORKERS workers) | req/s | p50 µs | p99 µs |"
echo "| --- | ---: | ---: | ---: |"
for y in handoff c; do
    printf '| %s | %s | %s | %s |\n' "${YARD_NAME[$y]}" "$(int "$(mat "yard-$y" keep rps)")" \
        "$(int "$(mat "yard-$y" keep p50_us)")" "$(int "$(mat "yard-$y" keep p99_us)")"
done
echo
y=$(ratio "$(mat yard-handoff keep rps)" "$(mat yard-c keep rps)")
echo "| vs the C yardstick | keep-alive req/s | target | |"
echo "| --- | ---: | ---: | --- |"
echo "| ${YARD_NAME[handoff]} / C epoll cluster | $y | ≥ 1.0 | $(verdict "$y" '>=' 1.0 "${YARD_NAME[handoff]} / C epoll cluster keep-alive req/s") |"
echo
echo "Each row is the median run by throughput of $RUNS (its conn/s or req/s, p50 and p99), the"
echo "servers taken in turn; ratios are of those runs. Every run: bench-cluster.svg. Same Rust load"
echo "client for all (\`handoff client rpc\`): short = \`--short --conns 16 --requests 500\` (one"
echo "connection per request), keep-alive = \`--conns 100 --requests 3000\`; 0 errors in every run."
echo "TCP vs Unix: one round-robin cluster started with \`--port P --listen unix:PATH\`, the same"
echo "keep-alive load over each (\`rpc --port P\` / \`rpc --unix PATH\`), taken in turn."
echo "Idle B/conn: summed VmRSS of master + workers with $IDLE_CONNS idle connections open, minus"
echo "the same before, / $IDLE_CONNS (user-space memory only, not kernel socket buffers);"
echo "of which the master: ${MEMSPLIT[round-robin]} B (round-robin), ${MEMSPLIT[node]} B (Node)."
for impl in round-robin node; do
    [ -z "${NOTE[$impl]:-}" ] || echo "${NAME[$impl]}: ${NOTE[$impl]}."
done
}
report >"$BENCH_TMP/report.md"
bench_publish bench-cluster "make bench-cluster: handoff cluster (2 workers) vs Node cluster, every run"
