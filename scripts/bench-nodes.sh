#!/usr/bin/env bash
# make bench-nodes: relay round trips between two nodes (2 workers each) on
# this machine, against the yardstick of the same client talking to node
# B's workers directly (one TCP round trip to a worker, one hop less), and
# the link setup time (connect to the handshake's end) p50/p99.
#   relay      two clients at once: --relay B:0 and --relay B:1 via node A
#   yardstick  two clients at once straight to node B (ping)
# RUNS (3) each; each row is the median run by requests/s (its p50, p99).
# Setup: ROUNDS (10) fresh node pairs with 4 workers each; every worker of A
# links to every worker of B (16 links a round); setup_us read from A's
# status. 3-host namespace run (root only; skipped otherwise): nodes A, B, C
# on three network namespaces joined by a bridge (scripts/hosts-lib.sh, as
# make demo-hosts), the clients in the bridge's namespace: relay via A to B
# against direct to B, RUNS runs each, as above.
# Targets: relay / direct >= 0.5 (both runs), link setup p99 < 5000 us; writes
# bench/results/bench-nodes.{md,svg,tsv}, exits 1 when a target is missed.
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
need_bin "$BIN"
need_plot
CONNS=${CONNS:-25}
REQS=${REQS:-2000}
ROUNDS=${ROUNDS:-10}

start_nodes() { # WORKERS: sets PA PB
    local w=$1
    PA=$(free_port)
    PB=$(free_port)
    bg_start nodeA "$BIN" node --name A --port "$PA" --workers "$w" --dir "$BENCH_TMP/A" --peers "B=127.0.0.1:$PB"
    NA=$BG_PID
    bg_start nodeB "$BIN" node --name B --port "$PB" --workers "$w" --dir "$BENCH_TMP/B" --peers "A=127.0.0.1:$PA"
    NB=$BG_PID
    wait_ready nodeA "$NA"
    wait_ready nodeB "$NB"
}

# two_clients PORT ARGS0 ARGS1: two client runs at once; prints summed rps,
# max p50, max p99. CLIENT_HOST (default 127.0.0.1) is the server's address,
# CLIENT_WRAP a command prefix (the hub's `ip netns exec`).
CLIENT_HOST=127.0.0.1
CLIENT_WRAP=()
two_clients() {
    local port=$1 a0=$2 a1=$3 l0 l1 rc=0
    # shellcheck disable=SC2086
    "${CLIENT_WRAP[@]}" "$BIN" client rpc --host "$CLIENT_HOST" --port "$port" --conns "$CONNS" --requests "$REQS" $a0 \
        >"$BENCH_TMP/c0" 2>&1 &
    local p0=$!
    # shellcheck disable=SC2086
    "${CLIENT_WRAP[@]}" "$BIN" client rpc --host "$CLIENT_HOST" --port "$port" --conns "$CONNS" --requests "$REQS" $a1 \
        >"$BENCH_TMP/c1" 2>&1 || rc=$?
    wait "$p0" || rc=$?
    l0=$(grep '^rpc' "$BENCH_TMP/c0" || true)
    l1=$(grep '^rpc' "$BENCH_TMP/c1" || true)
    if [ "$rc" -ne 0 ] || [ "$(field "$l0" errors)" != 0 ] || [ "$(field "$l1" errors)" != 0 ]; then
        say "bench: FAILED: $l0 / $l1"
        tail -n 5 "$BENCH_TMP/c0" "$BENCH_TMP/c1" >&2
        exit 1
    fi
    say "  $l0"
    say "  $l1"
    awk -v a="$(field "$l0" rps)" -v b="$(field "$l1" rps)" 'BEGIN { printf "%.0f", a + b }'
    printf ' %s %s\n' "$(median "$(field "$l0" p50_us)" "$(field "$l1" p50_us)")" \
        "$(median "$(field "$l0" p99_us)" "$(field "$l1" p99_us)")"
}

start_nodes 2
declare -a RELAY_RPS RELAY_P50 RELAY_P99 DIRECT_RPS DIRECT_P50 DIRECT_P99
for ((r = 0; r < RUNS; r++)); do
    say "run $((r + 1))/$RUNS: relay A -> B"
    read -r rps p50 p99 < <(two_clients "$PA" "--relay B:0" "--relay B:1")
    RELAY_RPS+=("$rps"); RELAY_P50+=("$p50"); RELAY_P99+=("$p99")
    plot_point "requests/s (2 clients summed)" "relay A -> B" "relay" "$rps"
    plot_point "p99 µs" "relay A -> B" "relay" "$p99"
    say "run $((r + 1))/$RUNS: direct to B"
    read -r rps p50 p99 < <(two_clients "$PB" "" "")
    DIRECT_RPS+=("$rps"); DIRECT_P50+=("$p50"); DIRECT_P99+=("$p99")
    plot_point "requests/s (2 clients summed)" "direct to B" "direct (yardstick)" "$rps"
    plot_point "p99 µs" "direct to B" "direct (yardstick)" "$p99"
done
bg_forget_stop "$NA" "$NB"

say "link setup: $ROUNDS rounds of 4x4 workers"
SETUP=()
for ((r = 0; r < ROUNDS; r++)); do
    start_nodes 4
    for w in 0 1 2 3; do
        # 8 connections land round-robin on A's 4 workers: each links to B:w.
        "$BIN" client rpc --port "$PA" --conns 8 --requests 1 --relay "B:$w" >/dev/null 2>&1 \
            || die "setup round $r: relay to B:$w failed"
    done
    deadline=$((SECONDS + 5))
    while :; do
        mapfile -t got < <("$BIN" status --dir "$BENCH_TMP/A" --json | python3 -c '
import json, sys
for w in json.load(sys.stdin)["workers"]:
    for l in w["links"]:
        if l["node"] == "B" and l["setup_us"]:
            print(l["setup_us"])')
        ((${#got[@]} >= 16 || SECONDS >= deadline)) && break
        sleep 0.05
    done
    ((${#got[@]} >= 16)) || die "setup round $r: only ${#got[@]} of 16 links reported"
    SETUP+=("${got[@]}")
    for v in "${got[@]}"; do plot_point "link setup µs (each link)" "round $((r + 1))" "link setup" "$v"; done
    bg_forget_stop "$NA" "$NB"
done
read -r s50 s99 smax < <(printf '%s\n' "${SETUP[@]}" | sort -n | awk '{a[NR] = $1}
    END { i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99 + 0.999); if (i99 > NR) i99 = NR
          print a[i50], a[i99], a[NR] }')

# Restarts under relay load: 2 clients relay A -> B:0 and A -> B:1 without
# pause while B (the far node) restarts RESTARTS times, then A does. Every
# relay must succeed; the row gives the clients' p99 over the whole run.
RESTARTS=${RESTARTS:-20}
RESTART_REQS=${RESTART_REQS:-8000}
say "restarts under relay load: $RESTARTS of B, then $RESTARTS of A"
start_nodes 2
"$BIN" client rpc --port "$PA" --conns "$CONNS" --requests "$RESTART_REQS" --relay B:0 >"$BENCH_TMP/r0" 2>&1 &
RC0=$!
"$BIN" client rpc --port "$PA" --conns "$CONNS" --requests "$RESTART_REQS" --relay B:1 >"$BENCH_TMP/r1" 2>&1 &
RC1=$!
restart_times=()
for node in B A; do
    for ((k = 1; k <= RESTARTS; k++)); do
        t0=$(date +%s.%N)
        "$BIN" restart --dir "$BENCH_TMP/$node" >"$BENCH_TMP/restart.out" 2>&1 \
            || { cat "$BENCH_TMP/restart.out" >&2; die "restart $k of $node failed"; }
        restart_times+=("$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')")
        plot_point "restart ms (under relay load)" "restart of $node" "node $node" "${restart_times[-1]}"
    done
done
kill -0 "$RC0" 2>/dev/null && kill -0 "$RC1" 2>/dev/null \
    || die "the relay clients ended before the $((2 * RESTARTS)) restarts did: raise RESTART_REQS"
rc=0
wait "$RC0" || rc=$?
wait "$RC1" || rc=$?
l0=$(grep '^rpc' "$BENCH_TMP/r0" || true)
l1=$(grep '^rpc' "$BENCH_TMP/r1" || true)
say "  $l0"
say "  $l1"
[ -n "$l0" ] && [ -n "$l1" ] || die "relay clients under restarts: no summary (rc $rc)"
R_FAILED=$(($(field "$l0" errors) + $(field "$l1" errors)))
R_RELAYS=$(($(field "$l0" ok) + $(field "$l1" ok)))
R_P99=$(awk -v a="$(field "$l0" p99_us)" -v b="$(field "$l1" p99_us)" 'BEGIN { print (a > b ? a : b) }')
R_MS=$(printf '%s\n' "${restart_times[@]}" | sort -n | awk '{a[NR] = $1} END { print a[int((NR + 1) / 2)], a[NR] }')
bg_forget_stop "$NA" "$NB"

# 3-host namespace run: the same two measurements between namespaces.
# shellcheck source=SCRIPTDIR/hosts-lib.sh
source "$ROOT/scripts/hosts-lib.sh"
HOSTS_SKIP=""
declare -a H_RELAY_RPS H_RELAY_P50 H_RELAY_P99 H_DIRECT_RPS H_DIRECT_P50 H_DIRECT_P99
if ! HOSTS_SKIP=$(hosts_check 2>&1); then
    say "3-host namespace run skipped: $HOSTS_SKIP"
elif ! hosts_up 2>"$BENCH_TMP/hosts.err"; then
    HOSTS_SKIP="network namespaces not allowed here: $(tail -n 1 "$BENCH_TMP/hosts.err")"
    say "3-host namespace run skipped: $HOSTS_SKIP"
else
    BENCH_AT_EXIT=hosts_down
    say "3-host namespace run: hosts $(hosts_ns 1) $(hosts_ns 2) $(hosts_ns 3)"
    HPIDS=()
    for i in 1 2 3; do
        hosts_node_cmd "$i" "$BIN" "$BENCH_TMP/host$i" 2
        bg_start "host$i" "${HOSTS_CMD[@]}"
        HPIDS+=("$BG_PID")
        wait_ready "host$i" "$BG_PID"
    done
    CLIENT_WRAP=(ip netns exec "$(hosts_ns hub)")
    for ((r = 0; r < RUNS; r++)); do
        say "3 hosts, run $((r + 1))/$RUNS: relay A -> B"
        CLIENT_HOST=$(hosts_addr 1)
        read -r rps p50 p99 < <(two_clients "$HOSTS_PORT" "--relay B:0" "--relay B:1")
        H_RELAY_RPS+=("$rps"); H_RELAY_P50+=("$p50"); H_RELAY_P99+=("$p99")
        plot_point "requests/s (2 clients summed)" "3 hosts: relay A -> B" "relay" "$rps"
        plot_point "p99 µs" "3 hosts: relay A -> B" "relay" "$p99"
        say "3 hosts, run $((r + 1))/$RUNS: direct to B"
        CLIENT_HOST=$(hosts_addr 2)
        read -r rps p50 p99 < <(two_clients "$HOSTS_PORT" "" "")
        H_DIRECT_RPS+=("$rps"); H_DIRECT_P50+=("$p50"); H_DIRECT_P99+=("$p99")
        plot_point "requests/s (2 clients summed)" "3 hosts: direct to B" "direct (yardstick)" "$rps"
        plot_point "p99 µs" "3 hosts: direct to B" "direct (yardstick)" "$p99"
    done
    CLIENT_WRAP=()
    CLIENT_HOST=127.0.0.1
    bg_forget_stop "${HPIDS[@]}"
fi

ri=$(median_idx "${RELAY_RPS[@]}")
di=$(median_idx "${DIRECT_RPS[@]}")
rr=${RELAY_RPS[ri]}
dr=${DIRECT_RPS[di]}
report() {
machine_line
echo
echo "| node mode (2 nodes x 2 workers, $((2 * CONNS)) keep-alive clients) | requests/s | p50 us | p99 us |"
echo "|---|---:|---:|---:|"
echo "| relay A -> B (client -> A worker -> B worker -> back) | $(int "$rr") | $(int "${RELAY_P50[ri]}") | $(int "${RELAY_P99[ri]}") |"
echo "| yardstick: direct to B's workers (one hop less) | $(int "$dr") | $(int "${DIRECT_P50[di]}") | $(int "${DIRECT_P99[di]}") |"
if [ -z "$HOSTS_SKIP" ]; then
    hri=$(median_idx "${H_RELAY_RPS[@]}")
    hdi=$(median_idx "${H_DIRECT_RPS[@]}")
    echo "| 3-host namespace run: relay A -> B (3 network namespaces, bridge) | $(int "${H_RELAY_RPS[hri]}") | $(int "${H_RELAY_P50[hri]}") | $(int "${H_RELAY_P99[hri]}") |"
    echo "| 3-host namespace run: direct to B's workers | $(int "${H_DIRECT_RPS[hdi]}") | $(int "${H_DIRECT_P50[hdi]}") | $(int "${H_DIRECT_P99[hdi]}") |"
fi
echo
echo "Each row is the median run by requests/s of $RUNS (its p50 and p99: the median of the two"
echo "clients'); every run and every link's setup time: bench-nodes.svg."
echo
echo "Relay / direct throughput: $(ratio "$rr" "$dr") (target >= 0.5: $(verdict "$(ratio "$rr" "$dr")" '>=' 0.5 "relay / direct requests/s"))."
echo "Relays during $RESTARTS restarts of B (the far node), then $RESTARTS of A: $R_RELAYS relays, $R_FAILED failed (target 0: $(verdict "$R_FAILED" '<=' 0 "failed relays during restarts")), p99 $(int "$R_P99") us; restart time median/max ${R_MS% *}/${R_MS#* } ms."
if [ -z "$HOSTS_SKIP" ]; then
    hr=${H_RELAY_RPS[hri]}
    hd=${H_DIRECT_RPS[hdi]}
    echo "3-host namespace run, relay / direct throughput: $(ratio "$hr" "$hd") (target >= 0.5: $(verdict "$(ratio "$hr" "$hd")" '>=' 0.5 "3-host relay / direct requests/s"))."
else
    echo "3-host namespace run: skipped ($HOSTS_SKIP)."
fi
echo "Link setup (connect to TELL_RESP), ${#SETUP[@]} links: p50 ${s50} us, p99 ${s99} us, max ${smax} us (target p99 < 5000 us: $(verdict "$s99" '<=' 5000 "link setup p99 us"))."
}
report >"$BENCH_TMP/report.md"
bench_publish bench-nodes "make bench-nodes: relay between two nodes vs direct, every run; link setup times"
