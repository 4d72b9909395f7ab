#!/usr/bin/env bash
# make bench-http: HTTP/1.1 servers with 2 workers each, side by side in one
# run, all loaded by wrk (bench/wrk_report.lua prints its figures in one
# parseable line):
#   handoff  the http example in cluster mode
#            (target/release/examples/http cluster --port P --workers 2 --dir D)
#   nginx    Debian's nginx, an instance of its own on a free port: a config
#            and prefix in a temp dir, worker_processes 2, return 200 "hello\n"
#            (default_type text/plain), access_log off, daemon off
#   node     Node's http under cluster, 2 workers, SCHED_RR
#            (bench/node_http_cluster.js)
# Every server answers GET / with 200 text/plain "hello\n". Rows:
#   keep-alive   wrk -t2 -c100 -d${BENCH_SECS}s                       (RUNS runs)
#   short        the same with -H 'Connection: close': one request a connection
#   restarts     wrk -t2 -c100 -d${RELOAD_SECS}s (20) on keep-alive while RELOADS
#                (10) restarts happen, evenly spaced (RELOAD_RUNS runs, 1):
#                  handoff: `http restart --dir D`, the example's own restart
#                           (`handoff restart --dir D` does the same): live
#                           connections move to the new generation; exits 0 once
#                           the new one has committed and answered
#                  nginx:   `nginx -p PREFIX -c CONF -s reload` (new workers; the
#                           old ones finish their requests and close their
#                           keep-alive connections), done once the new workers
#                           have started (error log)
#                  node:    SIGHUP to the primary: a rolling restart (fork a new
#                           worker, wait until it listens, drain + disconnect the
#                           old one; see bench/node_http_cluster.js), done at its
#                           "reloaded N" line
# Each row reports requests/s, p50/p99 latency, wrk's socket errors (connect,
# read, write, timeout) and non-2xx answers, of the run whose requests/s is
# the median. Targets: handoff keep-alive req/s >= 1.0x nginx and >= 2x Node;
# across its restarts handoff has 0 socket errors and 0 non-2xx, and all
# RELOADS restarts succeed. nginx's and Node's restart rows are reported, not
# targets. Writes bench/results/bench-http.{md,svg,tsv}; exits 1 when a target
# is missed.
# Knobs: BENCH_SECS (10), RUNS (3), RELOADS (10), RELOAD_SECS (20),
# RELOAD_RUNS (1), BENCH_PORT (base port), HTTP_SERVERS ("handoff nginx node":
# the servers to run; without handoff no target can be checked),
# HTTP_BIN (the http example), NGINX, NODE, WRK (the programs).
# shellcheck source=SCRIPTDIR/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

BENCH_SECS=${BENCH_SECS:-10}
RELOADS=${RELOADS:-10}
RELOAD_SECS=${RELOAD_SECS:-20}
RELOAD_RUNS=${RELOAD_RUNS:-1}
WORKERS=2
WRK_ARGS=(-t2 -c100 --timeout 2s)
HTTP_BIN=${HTTP_BIN:-$ROOT/target/release/examples/http}
read -r -a SERVERS <<<"${HTTP_SERVERS:-handoff nginx node}"
LUA=$ROOT/bench/wrk_report.lua

need_plot
for v in BENCH_SECS RELOADS RELOAD_SECS RELOAD_RUNS RUNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: give a positive whole number"
done
((${#SERVERS[@]})) || die "HTTP_SERVERS is empty"
has() { local s; for s in "${SERVERS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
prog() { # VAR NAME [FALLBACK]: the program VAR names, else NAME on PATH, else FALLBACK
    local v=${!1:-} p
    p=${v:-$(command -v "$2" || echo "${3:-}")}
    [ -n "$p" ] && [ -x "$p" ] || die "$2 is missing: run 'make bench-deps'"
    echo "$p"
}
for s in "${SERVERS[@]}"; do
    case $s in
        handoff)
            [ -x "$HTTP_BIN" ] || die "$HTTP_BIN is missing: build it with 'cargo build --release --examples' (make bench-http does), or run the others alone: HTTP_SERVERS='nginx node'" ;;
        nginx) NGINX=$(prog NGINX nginx /usr/sbin/nginx) ;;
        node) NODE=$(prog NODE node /usr/bin/node) ;;
        *) die "HTTP_SERVERS: unknown server '$s' (handoff, nginx, node)" ;;
    esac
done
WRK=$(prog WRK wrk)
[ -r "$LUA" ] || die "$LUA is missing"

hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard"

declare -A NAME=([handoff]="handoff http example (cluster)" [nginx]="nginx $("${NGINX:-true}" -v 2>&1 | sed -n 's|.*nginx/||p')"
                 [node]="Node $("${NODE:-true}" --version 2>/dev/null) http + cluster (SCHED_RR)")
declare -A HOW=([handoff]="http restart" [nginx]="nginx -s reload" [node]="rolling worker restart (SIGHUP)")
declare -A PORT PID
NGINX_PREFIX=$BENCH_TMP/nginx
HANDOFF_DIR=$BENCH_TMP/handoff-dir

# wait_port NAME PID PORT: until PORT takes connections (or PID exits / the
# deadline passes).
wait_port() {
    local name=$1 pid=$2 port=$3 deadline=$((SECONDS + READY_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { bg_tail "$name"; die "$name (pid $pid) exited before listening on $port"; }
        ((SECONDS < deadline)) || { bg_tail "$name"; die "$name (pid $pid): port $port not listening within ${READY_TIMEOUT}s"; }
        sleep 0.05
    done
}

nginx_conf() { # PORT: the nginx config, everything under $NGINX_PREFIX
    local p=$NGINX_PREFIX
    cat <<EOF
worker_processes $WORKERS;
daemon off;
pid $p/nginx.pid;
error_log $p/error.log notice;
events {
    worker_connections 4096;
}
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $p/body;
    proxy_temp_path $p/proxy;
    fastcgi_temp_path $p/fastcgi;
    uwsgi_temp_path $p/uwsgi;
    scgi_temp_path $p/scgi;
    server {
        listen 127.0.0.1:$1;
        location / {
            return 200 "hello\\n";
        }
    }
}
EOF
}
nginx_cmd() { "$NGINX" -p "$NGINX_PREFIX/" -c "$NGINX_PREFIX/nginx.conf" -e "$NGINX_PREFIX/error.log" "$@"; }
nginx_workers_started() { grep -c 'start worker process [0-9]' "$NGINX_PREFIX/error.log" 2>/dev/null || true; }

start_server() { # IMPL
    local impl=$1 p
    p=$(free_port)
    case $impl in
        handoff)
            bg_start_group "$impl" "$HTTP_BIN" cluster --port "$p" --workers "$WORKERS" --dir "$HANDOFF_DIR"
            wait_ready "$impl" "$BG_PID" ;;
        nginx)
            mkdir -p "$NGINX_PREFIX"
            nginx_conf "$p" >"$NGINX_PREFIX/nginx.conf"
            nginx_cmd -q -t >"$BENCH_TMP/nginx-t.err" 2>&1 || { cat "$BENCH_TMP/nginx-t.err" >&2; die "nginx rejects its config"; }
            bg_start_group "$impl" "$NGINX" -p "$NGINX_PREFIX/" -c "$NGINX_PREFIX/nginx.conf" -e "$NGINX_PREFIX/error.log"
            wait_port "$impl" "$BG_PID" "$p" ;;
        node)
            bg_start_group "$impl" "$NODE" "$ROOT/bench/node_http_cluster.js" "$p" "$WORKERS"
            wait_ready "$impl" "$BG_PID" ;;
    esac
    PORT[$impl]=$p
    PID[$impl]=$BG_PID
    say "${NAME[$impl]}: port $p ready (pid $BG_PID)"
}

# restart IMPL N: the N-th restart of IMPL, back when it is done; fails when
# it did not succeed.
restart() {
    local impl=$1 n=$2 before deadline
    case $impl in
        handoff)
            timeout 30 "$HTTP_BIN" restart --dir "$HANDOFF_DIR" >/dev/null 2>>"$BENCH_TMP/restart.err" ;;
        nginx)
            before=$(nginx_workers_started)
            nginx_cmd -s reload 2>>"$BENCH_TMP/restart.err" || return 1
            deadline=$((SECONDS + 15))
            until (($(nginx_workers_started) >= before + WORKERS)); do
                ((SECONDS < deadline)) || { echo "nginx: no new workers 15 s after reload $n" >>"$BENCH_TMP/restart.err"; return 1; }
                sleep 0.01
            done ;;
        node)
            kill -HUP "${PID[node]}" || return 1
            deadline=$((SECONDS + 15))
            until grep -q "^reloaded $n\$" "$BENCH_TMP/node.out"; do
                ((SECONDS < deadline)) || { echo "node: no 'reloaded $n' 15 s after SIGHUP" >>"$BENCH_TMP/restart.err"; return 1; }
                kill -0 "${PID[node]}" 2>/dev/null || return 1
                sleep 0.01
            done ;;
    esac
}

# run_wrk LABEL SECS PORT [WRK-ARG...]: one wrk run; sets WRK_LINE. A wrk that
# fails or prints no report line fails the script; errors are figures.
run_wrk() {
    local label=$1 secs=$2 port=$3 rc=0
    shift 3
    "$WRK" "${WRK_ARGS[@]}" -d"${secs}s" -s "$LUA" "$@" "http://127.0.0.1:$port/" \
        >"$BENCH_TMP/wrk.out" 2>"$BENCH_TMP/wrk.err" || rc=$?
    wrk_line "$label" "$rc" "$BENCH_TMP/wrk"
}
wrk_line() { # LABEL RC FILE-STEM
    WRK_LINE=$(grep '^wrk_report ' "$3.out" || true)
    if [ "$2" -ne 0 ] || [ -z "$WRK_LINE" ]; then
        say "bench: FAILED: $1: wrk exit $2, no report line"
        tail -n 10 "$3.out" "$3.err" >&2 || true
        exit 1
    fi
    say "  $1: ${WRK_LINE#wrk_report }"
}

METRICS=(rps p50_us p99_us connect read write timeout non2xx)
declare -A RES   # RES[impl,load,metric] = space-separated values, one per run
record() { # IMPL LOAD
    local m v errs=0
    for m in "${METRICS[@]}"; do
        v=$(field "$WRK_LINE" "$m")
        RES[$1,$2,$m]+="$v "
    done
    for m in connect read write timeout non2xx; do errs=$((errs + $(field "$WRK_LINE" "$m"))); done
    RES[$1,$2,errors]+="$errs "
    plot_point "requests/s" "${LOADLABEL[$2]}" "${NAME[$1]}" "$(field "$WRK_LINE" rps)"
    plot_point "p50 µs" "${LOADLABEL[$2]}" "${NAME[$1]}" "$(field "$WRK_LINE" p50_us)"
    plot_point "p99 µs" "${LOADLABEL[$2]}" "${NAME[$1]}" "$(field "$WRK_LINE" p99_us)"
    plot_point "socket errors + non-2xx" "${LOADLABEL[$2]}" "${NAME[$1]}" "$errs"
}
declare -A LOADLABEL=([keep]="keep-alive" [short]="short (Connection: close)" [reload]="$RELOADS restarts")

# ------------------------------------------------------------- servers
say "bench-http: ${SERVERS[*]}; $RUNS runs of ${BENCH_SECS}s per row, then $RELOAD_RUNS x ${RELOAD_SECS}s with $RELOADS restarts"
for impl in "${SERVERS[@]}"; do start_server "$impl"; done
for impl in "${SERVERS[@]}"; do
    run_wrk "warm-up ${NAME[$impl]}" 2 "${PORT[$impl]}"
done

# ------------------------------------------------------- keep-alive, short
for ((run = 1; run <= RUNS; run++)); do
    order=("${SERVERS[@]}")
    if ((run % 2 == 0)); then
        order=()
        for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do order+=("${SERVERS[i]}"); done
    fi
    for impl in "${order[@]}"; do
        run_wrk "run $run ${NAME[$impl]} keep-alive" "$BENCH_SECS" "${PORT[$impl]}"
        record "$impl" keep
        run_wrk "run $run ${NAME[$impl]} short" "$BENCH_SECS" "${PORT[$impl]}" -H 'Connection: close'
        record "$impl" short
    done
done

# ------------------------------------------------------------ restarts
declare -A RDONE RFAILED RMS   # per impl: restarts done, failed; their durations (ms)
for impl in "${SERVERS[@]}"; do
    for ((rr = 1; rr <= RELOAD_RUNS; rr++)); do
        : >"$BENCH_TMP/restart.err"
        bg_start "wrk-reload" "$WRK" "${WRK_ARGS[@]}" -d"${RELOAD_SECS}s" -s "$LUA" "http://127.0.0.1:${PORT[$impl]}/"
        wpid=$BG_PID
        t0=$(date +%s%N)
        done_n=0 failed=0
        for ((k = 1; k <= RELOADS; k++)); do
            # restart k at k/(RELOADS+1) of the run
            at_ns=$((t0 + k * RELOAD_SECS * 1000000000 / (RELOADS + 1)))
            now=$(date +%s%N)
            ((at_ns <= now)) || sleep "$(awk -v d=$((at_ns - now)) 'BEGIN { printf "%.3f", d / 1e9 }')"
            kill -0 "$wpid" 2>/dev/null || break
            t1=$(date +%s%N)
            n=$(( ${RDONE[$impl]:-0} + ${RFAILED[$impl]:-0} + 1 ))
            if restart "$impl" "$n"; then
                done_n=$((done_n + 1))
                RDONE[$impl]=$(( ${RDONE[$impl]:-0} + 1 ))
                ms=$(( ($(date +%s%N) - t1) / 1000000 ))
                RMS[$impl]+="$ms "
                plot_point "restart: ms until done" "each restart" "${NAME[$impl]}" "$ms"
            else
                failed=$((failed + 1))
                RFAILED[$impl]=$(( ${RFAILED[$impl]:-0} + 1 ))
            fi
        done
        wait "$wpid" && rc=0 || rc=$?
        bg_forget_stop "$wpid"
        wrk_line "restarts run $rr ${NAME[$impl]}" "$rc" "$BENCH_TMP/wrk-reload"
        record "$impl" reload
        say "  ${HOW[$impl]}: $done_n done, $failed failed"
        if ((failed)); then
            say "    the failed restarts said (last lines):"
            tail -n 5 "$BENCH_TMP/restart.err" | sed 's/^/      /' >&2
        fi
        ((done_n + failed == RELOADS)) \
            || say "bench: ${NAME[$impl]}: only $((done_n + failed)) of $RELOADS restarts fitted in the ${RELOAD_SECS}s of load"
    done
done
if has handoff; then
    GEN=$(timeout 10 "$HTTP_BIN" status --dir "$HANDOFF_DIR" --json 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["gen"])' 2>/dev/null || echo "?")
    say "handoff: generation $GEN after ${RDONE[handoff]:-0} restarts"
fi
for impl in "${SERVERS[@]}"; do bg_forget_stop "${PID[$impl]}"; done

# ---------------------------------------------------------------- table
declare -A MR   # MR[impl,load]: the median run by requests/s
for impl in "${SERVERS[@]}"; do
    for l in keep short reload; do MR[$impl,$l]=$(mrun "$impl" "$l"); done
done
mat() { at "$1" "$2" "$3" "${MR[$1,$2]}"; }
# shellcheck disable=SC2086
sum() { awk '{ for (i = 1; i <= NF; i++) s += $i } END { print s + 0 }' <<<"$*"; }

report() {
machine_line
echo
echo "| load (wrk -t2 -c100) | server ($WORKERS workers) | req/s | p50 µs | p99 µs | connect err | read err | write err | timeouts | non-2xx |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
local l label impl
for l in keep short reload; do
    case $l in
        keep) label="keep-alive, ${BENCH_SECS} s" ;;
        short) label="short: \`Connection: close\`, ${BENCH_SECS} s" ;;
        reload) label="keep-alive, ${RELOAD_SECS} s, $RELOADS restarts" ;;
    esac
    for impl in "${SERVERS[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
            "${NAME[$impl]}$([ $l = reload ] && echo " — ${HOW[$impl]}")" \
            "$(int "$(mat "$impl" $l rps)")" "$(mat "$impl" $l p50_us)" "$(mat "$impl" $l p99_us)" \
            "$(mat "$impl" $l connect)" "$(mat "$impl" $l read)" "$(mat "$impl" $l write)" \
            "$(mat "$impl" $l timeout)" "$(mat "$impl" $l non2xx)"
        label=""
    done
done
echo
echo "| restarts under load | done | failed | ms until done: median / max | socket errors + non-2xx, all runs |"
echo "| --- | ---: | ---: | ---: | ---: |"
for impl in "${SERVERS[@]}"; do
    # shellcheck disable=SC2086
    printf '| %s — %s | %s | %s | %s / %s | %s |\n' "${NAME[$impl]}" "${HOW[$impl]}" \
        "${RDONE[$impl]:-0}" "${RFAILED[$impl]:-0}" \
        "$( [ -n "${RMS[$impl]:-}" ] && int "$(median ${RMS[$impl]})" || echo —)" \
        "$( [ -n "${RMS[$impl]:-}" ] && printf '%s\n' ${RMS[$impl]} | sort -g | tail -n 1 || echo —)" \
        "$(sum "${RES[$impl,reload,errors]}")"
done
echo
echo "| target | value | target | |"
echo "| --- | ---: | ---: | --- |"
if has handoff; then
    local rn rd errs want=$((RELOADS * RELOAD_RUNS))
    if has nginx; then
        rn=$(ratio "$(mat handoff keep rps)" "$(mat nginx keep rps)")
        echo "| handoff / nginx keep-alive req/s | $rn | ≥ 1.0 | $(verdict "$rn" '>=' 1.0 "handoff / nginx keep-alive req/s") |"
    else
        echo "| handoff / nginx keep-alive req/s | not measured (HTTP_SERVERS) | ≥ 1.0 | |"
    fi
    if has node; then
        rd=$(ratio "$(mat handoff keep rps)" "$(mat node keep rps)")
        echo "| handoff / Node keep-alive req/s | $rd | ≥ 2 | $(verdict "$rd" '>=' 2 "handoff / Node keep-alive req/s") |"
    else
        echo "| handoff / Node keep-alive req/s | not measured (HTTP_SERVERS) | ≥ 2 | |"
    fi
    errs=$(sum "${RES[handoff,reload,errors]}")
    echo "| handoff across its restarts: socket errors + non-2xx | $errs | 0 | $(verdict "$errs" '==' 0 "handoff across its restarts: socket errors + non-2xx") |"
    echo "| handoff restarts that succeeded | ${RDONE[handoff]:-0} of $want | $want | $(verdict "${RDONE[handoff]:-0}" '==' "$want" "handoff restarts that succeeded (of $want)") |"
else
    echo "| every target | not measured: the handoff server was not run (HTTP_SERVERS=${SERVERS[*]}) | | |"
fi
echo
echo "Each row is the run whose req/s is the median (its p50, p99 and errors) of $RUNS runs of"
echo "${BENCH_SECS} s (restart rows: of $RELOAD_RUNS run(s) of ${RELOAD_SECS} s), the servers taken in turn, the"
echo "order reversed every other run; every run: bench-http.svg. Load: wrk 4.1 \`-t2 -c100 --timeout 2s\`"
echo "on 127.0.0.1 (same 2 cores as the servers), GET /, answer 200 text/plain \`hello\\n\`; errors"
echo "are wrk's counters (non-2xx: its status count, answers ≥ 400); latency excludes connect."
echo "Restarts: $RELOADS during each ${RELOAD_SECS} s keep-alive run, at k/$((RELOADS + 1)) of it. handoff:"
echo "\`http restart --dir D\` moves the live connections to a new generation and returns once it"
echo "is done${GEN:+ (generation $GEN at the end)}. nginx: \`nginx -s reload\`, done once the new workers have"
echo "started; the old ones finish in-flight requests and close their keep-alive connections,"
echo "which wrk sees as read errors. Node: the primary on SIGHUP forks a new worker, waits until it"
echo "listens, then drains the old one (its answers carry \`Connection: close\`) and calls"
echo "\`worker.disconnect()\` (which closes its idle keep-alive connections at once), one worker"
echo "after the other, SIGKILL after 5 s (bench/node_http_cluster.js); done at its \"reloaded\" line."
echo "nginx: config as in scripts/bench-http.sh (Debian defaults otherwise, keepalive_requests"
echo "1000); Node: node:http defaults (keepAliveTimeout 5 s)."
}
report >"$BENCH_TMP/report.md"
bench_publish bench-http "make bench-http: ${SERVERS[*]} (2 workers each) under wrk, every run"
