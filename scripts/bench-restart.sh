#!/usr/bin/env bash
# make bench-restart: hot restarts of a 2-worker cluster under load.
#   baseline          keep-alive (50 conns) + short-connection (4 slots) load, no restart
#   live restart      the same load while `handoff restart` runs back to back (up to RESTARTS=100)
#   listener-only     the same, with `restart --listeners-only`: the listener moves, the old
#                     connections are cut (a drain timeout of zero: what nginx/HAProxy/Envoy
#                     do to connections that outlive the drain)
# reports failed requests, p99 and max latency; then the time one restart
# takes with IDLE_CONNS (10000) idle connections moved, and whether all of
# them survived; then the scale row: one restart with SCALE_CONNS (10000)
# connections each holding part of a request (bench/idle_conns.py
# --partial) plus SCALE_PIPE (100) pipelining clients, the time to move them
# all and the loss (target 0). Targets: the live-restart row loses nothing
# (0 failed requests, every restart succeeded), one restart with the idle
# connections < 1000 ms, the scale row loses nothing. Prints a Markdown
# table; writes bench/results/bench-restart.{md,svg,tsv} (each case is one
# run, plotted as one point) and exits 1 when a target is missed.
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
need_bin "$BIN"
need_plot
RESTARTS=${RESTARTS:-100}
IDLE_CONNS=${IDLE_CONNS:-10000}
KA_REQS=${KA_REQS:-6000}
SHORT_REQS=${SHORT_REQS:-1500}
SCALE_CONNS=${SCALE_CONNS:-10000}
SCALE_PIPE=${SCALE_PIPE:-100}
SCALE_REQS=${SCALE_REQS:-3000}   # per pipelining client: long enough to span the restart

hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"

N=0
start_cluster() { # sets PORT MPID DIR
    N=$((N + 1))
    PORT=$(free_port)
    DIR=$BENCH_TMP/cluster$N
    bg_start "cluster$N" "$BIN" cluster --port "$PORT" --workers 2 --dir "$DIR"
    MPID=$BG_PID
    wait_ready "cluster$N" "$MPID"
}
# The current master (a restart replaces it; the new one is not our child).
master_pid() { "$BIN" status --dir "$DIR" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])'; }
stop_cluster() {
    local p
    p=$(master_pid 2>/dev/null || true)
    [ -n "$p" ] && [ "$p" != "$MPID" ] && kill -TERM "$p" 2>/dev/null
    bg_forget_stop "$MPID"
    [ -n "$p" ] && for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    return 0
}

# run_case LABEL [RESTART-ARGS]: the two loads, with restarts when args given
# (an empty string means plain restarts); prints one table row.
run_case() {
    local label=$1 restart=${2-none} ka short rc n=0 fails=0
    start_cluster
    "$BIN" client rpc --port "$PORT" --conns 50 --requests "$KA_REQS" >"$BENCH_TMP/ka" 2>"$BENCH_TMP/ka.err" &
    local kp=$!
    "$BIN" client rpc --port "$PORT" --conns 4 --requests "$SHORT_REQS" --short >"$BENCH_TMP/short" 2>"$BENCH_TMP/short.err" &
    local sp=$!
    if [ "$restart" != none ]; then
        while ((n < RESTARTS)) && kill -0 "$kp" 2>/dev/null; do
            # shellcheck disable=SC2086
            "$BIN" restart --dir "$DIR" $restart >/dev/null 2>>"$BENCH_TMP/restart.err" || fails=$((fails + 1))
            n=$((n + 1))
        done
    fi
    wait "$kp" || true
    wait "$sp" || true
    ka=$(grep '^rpc' "$BENCH_TMP/ka" || echo "rpc errors=?")
    short=$(grep '^rpc' "$BENCH_TMP/short" || echo "rpc errors=?")
    say "  $label: $n restarts ($fails failed)"
    ((fails == 0)) || { say "    the failed restarts said (last lines):"; tail -n 5 "$BENCH_TMP/restart.err" | sed 's/^/      /' >&2; }
    : >"$BENCH_TMP/restart.err"
    say "    $ka"
    say "    $short"
    stop_cluster
    local failed=$(($(field "$ka" errors) + $(field "$short" errors))) cat=${label%% (*}
    plot_point "keep-alive req/s" "$cat" "keep-alive load" "$(field "$ka" rps)"
    plot_point "short-connection req/s" "$cat" "short-connection load" "$(field "$short" rps)"
    plot_point "p99 µs" "$cat" "keep-alive load" "$(field "$ka" p99_us)"
    plot_point "p99 µs" "$cat" "short-connection load" "$(field "$short" p99_us)"
    plot_point "failed requests" "$cat" "both loads" "$failed"
    if [ "$restart" = "" ]; then   # the live restarts: nothing may be lost
        verdict "$failed" '==' 0 "$label: failed requests" >/dev/null
        verdict "$fails" '==' 0 "$label: failed restarts (of $n)" >/dev/null
    fi
    printf '| %s | %s%s | %s | %s / %s | %s / %s | %s / %s |\n' "$label" "$n" "$( ((fails == 0)) || echo " ($fails failed)")" \
        "$failed" \
        "$(field "$ka" p99_us)" "$(field "$ka" max_us)" "$(field "$short" p99_us)" "$(field "$short" max_us)" \
        "$(int "$(field "$ka" rps)")" "$(int "$(field "$short" rps)")"
}

ROWS=()
say "baseline"
ROWS+=("$(run_case "no restart")")
say "live restarts"
ROWS+=("$(run_case "handoff restart (connections move)" "")")
say "listener-only restarts"
ROWS+=("$(run_case "listener-only restart (connections cut)" "--listeners-only")")

say "one restart with $IDLE_CONNS idle connections"
start_cluster
bg_start idle python3 "$ROOT/bench/idle_conns.py" "$PORT" "$IDLE_CONNS"
IPID=$BG_PID
wait_line idle "$IPID" '^open' 120
open_now() { "$BIN" status --dir "$DIR" --json | python3 -c 'import json,sys; print(sum(w["open"] for w in json.load(sys.stdin)["workers"]))'; }
deadline=$((SECONDS + 30))
until [ "$(open_now)" -ge "$IDLE_CONNS" ] || ((SECONDS >= deadline)); do sleep 0.1; done
t0=$(date +%s%N)
"$BIN" restart --dir "$DIR" >/dev/null || die "restart with idle connections failed"
t1=$(date +%s%N)
ms=$(( (t1 - t0) / 1000000 ))
deadline=$((SECONDS + 10))
until [ "$(open_now)" -ge "$IDLE_CONNS" ] || ((SECONDS >= deadline)); do sleep 0.1; done
moved=$(open_now)
closed=$(grep -c '^closed' "$BENCH_TMP/idle.out" || true)
bg_forget_stop "$IPID"
stop_cluster
plot_point "one restart: ms" "$IDLE_CONNS idle conns" "restart" "$ms"

say "scale: one restart with $SCALE_CONNS connections holding a partial request + $SCALE_PIPE pipelining clients"
start_cluster
bg_start partial python3 "$ROOT/bench/idle_conns.py" "$PORT" "$SCALE_CONNS" --partial 7
PPID_=$BG_PID
wait_line partial "$PPID_" '^open' 120
deadline=$((SECONDS + 30))
until [ "$(open_now)" -ge "$SCALE_CONNS" ] || ((SECONDS >= deadline)); do sleep 0.1; done
bg_start pipe "$BIN" client rpc --port "$PORT" --conns "$SCALE_PIPE" --requests "$SCALE_REQS"
KP=$BG_PID
sleep 0.5
kill -0 "$KP" 2>/dev/null || say "bench: the pipelining clients ended before the restart began (raise SCALE_REQS)"
t0=$(date +%s%N)
"$BIN" restart --dir "$DIR" >/dev/null 2>>"$BENCH_TMP/restart.err" || say "bench: the scale restart failed: $(tail -n 1 "$BENCH_TMP/restart.err")"
t1=$(date +%s%N)
scale_ms=$(( (t1 - t0) / 1000000 ))
scale_gen=$("$BIN" status --dir "$DIR" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["gen"])')
kill -USR1 "$PPID_"   # every held request completes now; each must get its own reply
wait_line partial "$PPID_" '^replies' 60
scale_replies=$(grep '^replies' "$BENCH_TMP/partial.out")
scale_closed=$(grep -c '^closed' "$BENCH_TMP/partial.out" || true)
wait "$KP" || true
pipe=$(grep '^rpc' "$BENCH_TMP/pipe.out" || echo "rpc errors=?")
say "  restart ${scale_ms} ms (generation now $scale_gen); partial: $scale_replies, closed before: $scale_closed"
say "  $pipe"
bg_forget_stop "$PPID_" "$KP"
stop_cluster
scale_lost=$(( $(field "$scale_replies" lost) + $(field "$scale_replies" bad) ))
pipe_errors=$(field "$pipe" errors)
scale_loss=unknown
[[ ${pipe_errors:-} =~ ^[0-9]+$ ]] && scale_loss=$((scale_lost + pipe_errors))
plot_point "one restart: ms" "$SCALE_CONNS partial + $SCALE_PIPE pipelining" "restart" "$scale_ms"

report() {
machine_line
echo
echo "| restart bench (2 workers; load: 50 keep-alive conns + 4 short-connection slots) | restarts | failed requests | keep-alive p99 / max us | short p99 / max us | keep-alive / short req/s |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Target for the live-restart row: 0 failed requests and every restart succeeded: $(grep -q '^handoff restart (connections move)' "$MISSED" && echo '**missed**' || echo met)."
echo
echo "One restart moving $IDLE_CONNS idle connections: ${ms} ms (target < 1000 ms: $(verdict "$ms" '<=' 1000 "one restart with $IDLE_CONNS idle connections, ms")); open on the new generation afterwards: $moved; closed by the server: $closed."
echo
echo "| scale restart (2 workers) | connections | restart ms | partial requests lost / wrong | pipelined requests failed | loss target 0 |"
echo "|---|---:|---:|---:|---:|---|"
printf '| %s partial requests + %s pipelining clients (gen %s after) | %s | %s | %s / %s | %s | %s |\n' \
    "$SCALE_CONNS" "$SCALE_PIPE" "$scale_gen" "$((SCALE_CONNS + SCALE_PIPE))" "$scale_ms" \
    "$(field "$scale_replies" lost)" "$(field "$scale_replies" bad)" "${pipe_errors:-?}" \
    "$(verdict "$scale_loss" '==' 0 "scale restart: requests lost, wrong or failed")"
echo
echo "Each case is one run (one point each in bench-restart.svg)."
}
report >"$BENCH_TMP/report.md"
bench_publish bench-restart "make bench-restart: hot restarts under load (each case one run)"
