#!/usr/bin/env bash
# make bench-rebalance: live rebalancing (`handoff cluster --rebalance`) on
# a 2-worker cluster, all driven by the same Rust load client
# (`handoff client work`: CPU work of US µs per request, one request in
# flight per connection, every reply checked):
#   skewed  CONNS (40) keep-alive connections, only those that start on
#           worker 0 (the 20 of round-robin) send work, SKEW_SECS (8) s:
#           handoff without --rebalance, with --rebalance, Node's cluster
#           (bench/node_cluster.js, SCHED_RR; it never moves a connection)
#   even    all CONNS send work, EVEN_SECS (10) s: handoff without and
#           with --rebalance
# each RUNS times (default 3), a fresh server per run, the arms taken in
# turn. Reports throughput (whole run, first 3 s, the rest), p50/p99/max
# latency and the connections moved, each row the median run by
# throughput. Targets: skewed throughput with --rebalance >= 1.4x without,
# skewed p99 with --rebalance <= 0.6x without, even throughput with
# --rebalance >= 0.97x without, and no connection moved without
# --rebalance. Writes bench/results/bench-rebalance.{md,svg,tsv} (every
# run a point) and bench-rebalance-time.{svg,tsv}: per worker, over time,
# the driven connections (the client's whoami every 200 ms) and the busy
# share (utime + stime from /proc/PID/stat every 200 ms, by the client, the
# same for every arm) of each arm's median run. Exits 1 when a target is
# missed; any run with an error fails the script.
# Knobs: RUNS, BENCH_PORT, REBAL_CONNS, REBAL_US, REBAL_SKEW_SECS,
# REBAL_EVEN_SECS, REBAL_POLICY (round-robin; any --policy).
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

WORKERS=2
CONNS=${REBAL_CONNS:-40}
US=${REBAL_US:-300}
SKEW_SECS=${REBAL_SKEW_SECS:-8}
EVEN_SECS=${REBAL_EVEN_SECS:-10}
POLICY=${REBAL_POLICY:-round-robin}
SAMPLE_MS=200
for v in CONNS US SKEW_SECS EVEN_SECS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || ((${!v} == 0)); then die "REBAL_$v=${!v}: give a whole number > 0"; fi
done
((SKEW_SECS > 3 && EVEN_SECS > 3)) || die "the runs must be longer than 3 s (the split of the throughput)"
need_bin "$BIN"
need_plot

need_node

ARMS=(skew-off skew-on skew-node even-off even-on)
declare -A NAME=([skew-off]="handoff" [skew-on]="handoff --rebalance" [skew-node]="Node cluster (SCHED_RR)"
                 [even-off]="handoff" [even-on]="handoff --rebalance")
declare -A SECS=([skew-off]=$SKEW_SECS [skew-on]=$SKEW_SECS [skew-node]=$SKEW_SECS
                 [even-off]=$EVEN_SECS [even-on]=$EVEN_SECS)
declare -A WORKLOAD=([skew-off]=skewed [skew-on]=skewed [skew-node]=skewed [even-off]=even [even-on]=even)

# run_arm ARM RUN: a fresh server, a warm-up, one measured run, stop.
# Stores the figures in RES[ARM,x,METRIC]; the trace in trace-ARM-RUN.tsv.
declare -A RES
run_arm() {
    local arm=$1 run=$2 tag=$1-$2 p dir="" pid only=() secs=${SECS[$1]} moves="nan"
    p=$(free_port)
    case $arm in
        skew-node) bg_start_group "$tag" "$NODE" "$ROOT/bench/node_cluster.js" "$p" "$WORKERS" ;;
        *-off | *-on)
            dir=$BENCH_TMP/$tag-dir
            local flags=(cluster --port "$p" --workers "$WORKERS" --dir "$dir" --policy "$POLICY")
            [ "${arm##*-}" = on ] && flags+=(--rebalance)
            bg_start_group "$tag" "$BIN" "${flags[@]}"
            ;;
    esac
    pid=$BG_PID
    wait_ready "$tag" "$pid"
    load "warm-up $tag" rpc --port "$p" --conns 4 --requests 200
    load "warm-up $tag" work --port "$p" --conns 2 --us 100 --secs 0.5
    [ "${WORKLOAD[$arm]}" = skewed ] && only=(--only-worker 0)
    load "run $run ${WORKLOAD[$arm]} ${NAME[$arm]}" work --port "$p" --conns "$CONNS" --us "$US" --secs "$secs" \
        "${only[@]}" --sample-ms "$SAMPLE_MS" --trace "$BENCH_TMP/trace-$tag.tsv"
    local m
    for m in driven rps p50_us p99_us max_us moved first_moved_ms client_cpu_pct rps_0_3 "rps_3_$secs" "p99_3_$secs"; do
        RES[$arm,x,${m%_"$secs"}]+="$(field "$LOAD_LINE" "$m") "
    done
    if [ -n "$dir" ]; then
        # What the master counted (the status fields --rebalance brought).
        moves=$(timeout 10 "$BIN" status --dir "$dir" --json 2>>"$BENCH_TMP/status.err" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(sum(w.get("moved_out", 0) for w in v["workers"]))' 2>>"$BENCH_TMP/status.err" || echo nan)
    fi
    RES[$arm,x,moves]+="$moves "
    bg_forget_stop "$pid"
    local cat=${WORKLOAD[$arm]}
    plot_point "work replies/s" "$cat" "${NAME[$arm]}" "$(field "$LOAD_LINE" rps)"
    plot_point "p50 µs" "$cat" "${NAME[$arm]}" "$(field "$LOAD_LINE" p50_us)"
    plot_point "p99 µs" "$cat" "${NAME[$arm]}" "$(field "$LOAD_LINE" p99_us)"
    plot_point "max µs" "$cat" "${NAME[$arm]}" "$(field "$LOAD_LINE" max_us)"
}

say "bench-rebalance: $RUNS runs per arm, $WORKERS workers, $CONNS connections, $US µs per request, policy $POLICY; raw client lines follow"
for ((run = 1; run <= RUNS; run++)); do
    if ((run % 2)); then order=("${ARMS[@]}"); else order=(even-on even-off skew-node skew-on skew-off); fi
    for arm in "${order[@]}"; do run_arm "$arm" "$run"; done
done

# ---------------------------------------------------------------- table
declare -A MR   # MR[arm]: the median run (0-based) by throughput
for arm in "${ARMS[@]}"; do MR[$arm]=$(mrun "$arm" x); done
# mat ARM METRIC: METRIC of the median run.
mat() { at "$1" x "$2" "${MR[$1]}"; }
# cell ARM METRIC: that figure rounded, or — when there is none.
cell() {
    local v
    v=$(mat "$1" "$2")
    case $v in nan | "") echo "—" ;; -1) echo "never" ;; *) int "$v" ;; esac
}

rps_on_off=$(ratio "$(mat skew-on rps)" "$(mat skew-off rps)")
p99_on_off=$(ratio "$(mat skew-on p99_us)" "$(mat skew-off p99_us)")
even_on_off=$(ratio "$(mat even-on rps)" "$(mat even-off rps)")
# shellcheck disable=SC2086
moved_off=$(printf '%s\n' ${RES[skew-off,x,moved]} ${RES[even-off,x,moved]} | awk '{ s += $1 } END { print s + 0 }')
# shellcheck disable=SC2086
client_cpu=$(printf '%s\n' ${RES[skew-off,x,client_cpu_pct]} ${RES[skew-on,x,client_cpu_pct]} ${RES[skew-node,x,client_cpu_pct]} \
    ${RES[even-off,x,client_cpu_pct]} ${RES[even-on,x,client_cpu_pct]} | sort -g | tail -n 1)

report() {
machine_line
echo
echo "Skewed: $CONNS connections, only those that start on worker 0 send work ($US µs each, one in flight per connection), $SKEW_SECS s."
echo
echo "| server ($WORKERS workers) | driven | req/s | req/s 0–3 s | req/s 3–$SKEW_SECS s | p50 µs | p99 µs | p99 3–$SKEW_SECS s | max µs | moved | moves (master) | 8 moved after ms |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for arm in skew-off skew-on skew-node; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${NAME[$arm]}" \
        "$(cell "$arm" driven)" "$(cell "$arm" rps)" "$(cell "$arm" rps_0_3)" "$(cell "$arm" rps_3)" \
        "$(cell "$arm" p50_us)" "$(cell "$arm" p99_us)" "$(cell "$arm" p99_3)" "$(cell "$arm" max_us)" \
        "$(cell "$arm" moved)" "$(cell "$arm" moves)" "$(cell "$arm" first_moved_ms)"
done
echo
echo "Even: all $CONNS connections send work ($US µs each), $EVEN_SECS s."
echo
echo "| server ($WORKERS workers) | driven | req/s | req/s 0–3 s | req/s 3–$EVEN_SECS s | p50 µs | p99 µs | max µs | moved | moves (master) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for arm in even-off even-on; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "${NAME[$arm]}" \
        "$(cell "$arm" driven)" "$(cell "$arm" rps)" "$(cell "$arm" rps_0_3)" "$(cell "$arm" rps_3)" \
        "$(cell "$arm" p50_us)" "$(cell "$arm" p99_us)" "$(cell "$arm" max_us)" "$(cell "$arm" moved)" "$(cell "$arm" moves)"
done
echo
echo "| --rebalance vs without | value | target | |"
echo "| --- | ---: | ---: | --- |"
echo "| skewed req/s | $rps_on_off | ≥ 1.4 | $(verdict "$rps_on_off" '>=' 1.4 "skewed req/s, --rebalance / without") |"
echo "| skewed p99 | $p99_on_off | ≤ 0.6 | $(verdict "$p99_on_off" '<=' 0.6 "skewed p99, --rebalance / without") |"
echo "| even req/s | $even_on_off | ≥ 0.97 | $(verdict "$even_on_off" '>=' 0.97 "even req/s, --rebalance / without") |"
echo "| connections moved without --rebalance (every run) | $moved_off | 0 | $(verdict "$moved_off" '==' 0 "connections moved without --rebalance") |"
echo
echo "Each row is the median run by throughput of $RUNS (its req/s, latencies and moves), a fresh"
echo "server per run, the arms taken in turn; ratios are of those runs. Every run: bench-rebalance.svg."
echo "Same Rust load client for all (\`handoff client work --conns $CONNS --us $US\`, \`--only-worker 0\` when"
echo "skewed), policy $POLICY; 0 errors in every run (each reply checked, in order, exactly once; a"
echo "whoami between two work requests every $SAMPLE_MS ms tells where each connection is). req/s and"
echo "the latencies count work replies only; p99 is of the whole run, p99 3–N s of the replies after"
echo "the first 3 s. Moved: driven connections on another worker at the end than at the start"
echo "(client's whoami); moves (master): \`moved_out\` summed over the workers in \`handoff status\`;"
echo "8 moved after: ms until the client saw 8 driven connections on another worker. The load client"
echo "used at most ${client_cpu}% of one CPU in any run."
echo
echo "Over time (bench-rebalance-time.svg, the median run of each arm): driven connections per worker"
echo "(the client's whoami every $SAMPLE_MS ms) and each worker's busy share (utime + stime from"
echo "/proc/PID/stat every $SAMPLE_MS ms, sampled by the client for every arm alike; ticks of 10 ms, so a"
echo "sample can read a little over 1)."
}
report >"$BENCH_TMP/report.md"

# ------------------------------------------------------- timeline plot
# bench-rebalance-time.tsv: the median run's trace of each arm, one row per
# sample: arm, t_s, rps, then conns_w0..., busy_w0... .
TIME_TSV=$RESULTS_DIR/bench-rebalance-time.tsv
TIME_SVG=$RESULTS_DIR/bench-rebalance-time.svg
mkdir -p "$RESULTS_DIR"
{
    printf '# arm\tt_s\trps'
    for ((w = 0; w < WORKERS; w++)); do printf '\tconns_w%d' "$w"; done
    for ((w = 0; w < WORKERS; w++)); do printf '\tbusy_w%d' "$w"; done
    printf '\n'
    for arm in "${ARMS[@]}"; do
        awk -F'\t' -v arm="$arm" -v n="$WORKERS" '
            NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
            {
                line = arm "\t" $col["t_s"] "\t" $col["rps"]
                for (w = 0; w < n; w++) line = line "\t" (("conns_w" w) in col ? $col["conns_w" w] : 0)
                for (w = 0; w < n; w++) line = line "\t" (("busy_w" w) in col ? $col["busy_w" w] : "nan")
                print line
            }' "$BENCH_TMP/trace-$arm-$((MR[$arm] + 1)).tsv"
    done
} >"$TIME_TSV"

plot_time() {
    local arm rows=${#ARMS[@]} w i=0
    local colours=("#1f77b4" "#d62728" "#2ca02c" "#ff7f0e")
    printf 'set terminal svg size 1500,%d dynamic noenhanced font "sans,11" background "white"\n' $((rows * 260 + 40))
    echo "set encoding utf8"
    printf "set output '%s'\n" "$TIME_SVG"
    printf "set multiplot layout %d,3 title 'make bench-rebalance: per worker over time, the median run of each arm (%s µs per request, %s connections)'\n" \
        "$rows" "$US" "$CONNS"
    echo 'set grid ytics lc rgb "#dddddd"'
    echo "set key top right horizontal"
    echo "set border 3; set tics nomirror"
    echo "set xlabel 's'"
    for arm in "${ARMS[@]}"; do
        i=$((i + 1))
        echo "\$d$i << EOD"
        awk -F'\t' -v arm="$arm" '$1 == arm { $1 = ""; sub(/^ /, ""); print }' OFS=' ' "$TIME_TSV"
        echo "EOD"
        local title="${WORKLOAD[$arm]}, ${NAME[$arm]}"
        printf 'set xrange [0:%s]\n' "${SECS[$arm]}"
        printf "set title '%s: driven connections per worker'\n" "$title"
        printf 'set yrange [0:%s]\n' "$CONNS"
        local plot=""
        for ((w = 0; w < WORKERS; w++)); do
            # dashed from worker 1 on: equal counts stay visible
            plot+="${plot:+, }\$d$i using 1:$((3 + w)) with steps lw 2 dt $((w ? 2 : 1)) lc rgb '${colours[w % 4]}' title 'worker $w'"
        done
        echo "plot $plot"
        printf "set title '%s: busy share per worker (/proc)'\n" "$title"
        echo 'set yrange [0:1.3]'
        plot=""
        for ((w = 0; w < WORKERS; w++)); do
            plot+="${plot:+, }\$d$i using 1:$((3 + WORKERS + w)) with lines lw 2 lc rgb '${colours[w % 4]}' title 'worker $w'"
        done
        echo "plot $plot"
        printf "set title '%s: work replies/s'\n" "$title"
        echo 'set yrange [0:*]'
        echo "plot \$d$i using 1:2 with lines lw 2 lc rgb '#555555' notitle"
    done
    echo "unset multiplot"
}
plot_time >"$BENCH_TMP/time.gp"
gnuplot "$BENCH_TMP/time.gp" || die "plotting $TIME_SVG failed"
say "bench: wrote $TIME_SVG, bench-rebalance-time.tsv"

bench_publish bench-rebalance "make bench-rebalance: $CONNS connections, $US µs per request, 2 workers; every run"
