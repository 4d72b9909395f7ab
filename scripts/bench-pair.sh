#!/usr/bin/env bash
# make bench-pair: the project's pair servers against the C epoll yardstick
# (bench/pair_epoll.c), both driven by the same Rust load client:
#   unary 100 conns x 1000 requests, stream 1 x 1000, stream 100 x 1000,
# each RUNS times (default 3), the two implementations alternated. Prints a
# Markdown table of the median runs (by req/s: req/s, p50, p99, time of that
# run) and the ratios handoff/C against the targets: unary req/s >= 0.8,
# stream 1x1000 time <= 2; writes bench/results/bench-pair.{md,svg,tsv} and
# exits 1 when a target is missed. Any run with an error or a broken
# xor(P,P+1) check fails the script.
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

CBIN=$ROOT/build/pair_epoll
need_bin "$BIN" "$CBIN"
need_plot

IMPLS=(handoff c)
declare -A NAME=([handoff]="handoff pair" [c]="C epoll pair")
LOADS=("unary 100 1000" "stream 1 1000" "stream 100 1000")
declare -A PORT

# start_pair IMPL: two servers on P, P+1 (P even, so the client's xor check
# applies), each told the other's port; waits for both "ready" lines, then
# until a probe client sees the connections move (the channel is up).
start_pair() {
    local impl=$1 p q dir me peer
    p=$(free_port pair)
    q=$((p + 1))
    dir=$BENCH_TMP/$impl-dir
    mkdir -p -m 700 "$dir"
    for me in "$p" "$q"; do
        peer=$((me ^ 1))
        if [ "$impl" = handoff ]; then
            bg_start "$impl-$me" "$BIN" server --port "$me" --peer-port "$peer" --dir "$dir"
        else
            bg_start "$impl-$me" "$CBIN" "$me" "$peer" "$dir"
        fi
        wait_ready "$impl-$me" "$BG_PID"
    done
    local deadline=$((SECONDS + READY_TIMEOUT))
    until timeout 10 "$BIN" client unary --port "$p" --conns 1 --requests 4 >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { bg_tail "$impl-$p"; bg_tail "$impl-$q"; die "${NAME[$impl]} on $p,$q: connections never moved between the two servers"; }
        sleep 0.05
    done
    PORT[$impl]=$p
    say "${NAME[$impl]}: ports $p,$q ready"
}

say "bench-pair: $RUNS runs per load; raw client lines follow"
for impl in "${IMPLS[@]}"; do start_pair "$impl"; done

# Warm-up (not counted).
for impl in "${IMPLS[@]}"; do
    load "warm-up ${NAME[$impl]}" unary --port "${PORT[$impl]}" --conns 10 --requests 100
done

declare -A RES   # RES[impl,load,metric] = space-separated values, one per run
for ((run = 1; run <= RUNS; run++)); do
    if ((run % 2)); then order=(handoff c); else order=(c handoff); fi
    for impl in "${order[@]}"; do
        for i in "${!LOADS[@]}"; do
            read -r mode conns reqs <<<"${LOADS[i]}"
            load "run $run ${NAME[$impl]}" "$mode" --port "${PORT[$impl]}" --conns "$conns" --requests "$reqs"
            for m in rps p50_us p99_us secs; do
                RES[$impl,$i,$m]+="$(field "$LOAD_LINE" "$m") "
            done
            label="$mode $conns×$reqs"
            plot_point "req/s" "$label" "${NAME[$impl]}" "$(field "$LOAD_LINE" rps)"
            plot_point "p50 µs" "$label" "${NAME[$impl]}" "$(field "$LOAD_LINE" p50_us)"
            plot_point "p99 µs" "$label" "${NAME[$impl]}" "$(field "$LOAD_LINE" p99_us)"
        done
    done
done


declare -A MR   # MR[impl,load]: the median run by req/s
for i in "${!LOADS[@]}"; do
    for impl in "${IMPLS[@]}"; do MR[$impl,$i]=$(mrun "$impl" "$i"); done
done
# mat IMPL LOAD METRIC: METRIC of the median run.
mat() { at "$1" "$2" "$3" "${MR[$1,$2]}"; }

report() {
machine_line
echo
echo "| load | server | req/s | p50 µs | p99 µs | time s |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for i in "${!LOADS[@]}"; do
    read -r mode conns reqs <<<"${LOADS[i]}"
    label="$mode, $conns conn$([ "$conns" = 1 ] || echo s) × $reqs req"
    for impl in "${IMPLS[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "${NAME[$impl]}" \
            "$(int "$(mat "$impl" "$i" rps)")" "$(int "$(mat "$impl" "$i" p50_us)")" \
            "$(int "$(mat "$impl" "$i" p99_us)")" "$(mat "$impl" "$i" secs)"
        label=""
    done
done
echo
unary_ratio=$(ratio "$(mat handoff 0 rps)" "$(mat c 0 rps)")
stream_ratio=$(ratio "$(mat handoff 1 secs)" "$(mat c 1 secs)")
echo "| handoff / C | ratio | target | |"
echo "| --- | ---: | ---: | --- |"
echo "| unary 100 × 1000 req/s | $unary_ratio | ≥ 0.8 | $(verdict "$unary_ratio" '>=' 0.8 "handoff/C unary req/s") |"
echo "| stream 1 × 1000 time | $stream_ratio | ≤ 2 | $(verdict "$stream_ratio" '<=' 2 "handoff/C stream 1 × 1000 time") |"
echo "| stream 1 × 1000 time (issue 16) | $stream_ratio | ≤ 1.3 | $(verdict "$stream_ratio" '<=' 1.3 "handoff/C stream 1 × 1000 time, issue 16") |"
echo
echo "Each row is the median run by req/s of $RUNS (its req/s, p50, p99 and time), the two"
echo "implementations alternated; ratios are of those runs. Every run: bench-pair.svg."
echo "Both pairs are two processes on 127.0.0.1 (\`handoff server\` ×2, \`build/pair_epoll\` ×2),"
echo "driven by the same Rust load client (\`handoff client unary|stream\`, 16-byte payloads);"
echo "every run had 0 errors and 0 breaks of the xor(P,P+1) check. handoff also writes its"
echo "per-request log (D/P.log); the C yardstick keeps none."
}
report >"$BENCH_TMP/report.md"
bench_publish bench-pair "make bench-pair: handoff pair vs C epoll pair, every run"
