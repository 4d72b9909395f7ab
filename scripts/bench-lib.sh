# shellcheck shell=bash
# Shared helpers for scripts/bench-*.sh. Sourced, not run.
# Servers bind 127.0.0.1 on ports picked free at run time, or counted up from
# BENCH_PORT when that is set; every process started through bg_start is
# stopped on exit (trap EXIT), even when the script fails — with its whole
# process group when started through bg_start_group. Progress goes to
# stderr, the result table to stdout and to bench/results/NAME.md, every run
# as a point to bench/results/NAME.svg (scripts/bench-plot.sh) with its data
# in NAME.tsv (another plotter: BENCH_PLOTTER=SCRIPT, same arguments); a
# missed target makes the script exit 1 (bench_publish).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release/handoff
RUNS=${RUNS:-3}                        # measured runs per load and server
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-60}   # seconds one load-client run may take
READY_TIMEOUT=${READY_TIMEOUT:-15}     # seconds a server gets to print "ready"
RESULTS_DIR=${BENCH_RESULTS:-$ROOT/bench/results}
BENCH_PORT=${BENCH_PORT:-}             # base port; empty: free ports picked at run time

BENCH_TMP=$(mktemp -d "${TMPDIR:-/tmp}/handoff-bench.XXXXXX")
BENCH_PIDS=()
declare -A BENCH_GROUP=()              # pid -> 1: stop its whole process group
RUNS_TSV=$BENCH_TMP/runs.tsv           # plot_point appends here
MISSED=$BENCH_TMP/missed               # verdict appends missed targets here
: >"$RUNS_TSV"
: >"$MISSED"
# How busy the CPUs were (%) over half a second before the bench began:
# other work on the machine skews every figure.
BENCH_BUSY0=$({ head -n 1 /proc/stat; sleep 0.5; head -n 1 /proc/stat; } 2>/dev/null | awk '
    { idle = $5 + $6; tot = 0; for (i = 2; i <= NF; i++) tot += $i
      if (NR == 1) { i0 = idle; t0 = tot } else if (tot > t0) printf "%.0f", 100 * (1 - (idle - i0) / (tot - t0)) }')

say() { printf '%s\n' "$*" >&2; }
die() { say "bench: $*"; exit 1; }

# Stops one background process: SIGTERM, up to 8 s (a cluster master gives
# its workers a 5 s grace), then SIGKILL. For one started by bg_start_group,
# whatever is left of its process group afterwards (workers, the masters a
# hot restart started) gets SIGTERM, then SIGKILL 8 s later.
bg_stop() {
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 80; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "bench: pid $pid ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    if [ -n "${BENCH_GROUP[$pid]:-}" ] && group_alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for ((i = 0; i < 80; i++)); do
            group_alive "$pid" || break
            sleep 0.1
        done
        if group_alive "$pid"; then
            say "bench: process group $pid ignored SIGTERM; killing it"
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    fi
    return 0
}

# group_alive PGID: true while a process of that group runs (zombies aside).
group_alive() {
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

bench_cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    [ -z "${OTHERS_PID:-}" ] || { kill "$OTHERS_PID" 2>/dev/null; wait "$OTHERS_PID" 2>/dev/null; } || true
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
        bg_stop "${BENCH_PIDS[i]}"
    done
    # A script's own clean-up (network namespaces), after its processes.
    [ -z "${BENCH_AT_EXIT:-}" ] || eval "$BENCH_AT_EXIT" || true
    rm -rf "$BENCH_TMP"
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ "${BENCH_BUSY0:-0}" -ge 20 ]; then
    say "bench: WARNING: the CPUs were ${BENCH_BUSY0}% busy before the start: other work on this machine skews the figures"
fi

# ------------------------------------------- other work on this machine
# Every second a sampler notes the CPU time of each process that is not this
# bench's (neither a descendant of this script nor in a process group that
# bg_start_group made; kernel threads aside). others_pct: the share of the
# machine's CPU time those took since the start, in % (processes that came
# and went between two samples are missed; so is interrupt time).
OTHERS_STATE=$BENCH_TMP/others.state   # pid starttime first-ticks last-ticks
BENCH_GROUPS_FILE=$BENCH_TMP/groups    # the process groups bg_start_group made
: >"$BENCH_GROUPS_FILE"
BENCH_T0_TICKS=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%d", $1 * hz }' /proc/uptime)
BENCH_T0=$(date +%s%N)
others_sample() {
    local me=$$ tmp=$OTHERS_STATE.$BASHPID
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v me="$me" -v t0="$BENCH_T0_TICKS" \
        -v gf="$BENCH_GROUPS_FILE" -v sf="$OTHERS_STATE" -v tmp="$tmp" '
        BEGIN {
            while ((getline l < gf) > 0) grp[l] = 1
            while ((getline l < sf) > 0) { split(l, a, " "); first[a[1] " " a[2]] = a[3] }
        }
        {
            pid = $1; line = $0; sub(/^.*\) /, "", line); n = split(line, f, " ")
            if (n < 20) next
            ppid[pid] = f[2]; pg[pid] = f[3]; ticks[pid] = f[12] + f[13]; st[pid] = f[20]
        }
        END {
            for (pid in ppid) {           # ours: descendants of me, or in our groups
                p = pid; ours = 0
                for (d = 0; d < 64 && p > 1; d++) { if (p == me) { ours = 1; break }; p = ppid[p] }
                if (ours || (pg[pid] in grp) || pid == 2 || ppid[pid] == 2) continue
                k = pid " " st[pid]
                f0 = (k in first) ? first[k] : (st[pid] >= t0 ? 0 : ticks[pid])
                out = out k " " f0 " " ticks[pid] "\n"
            }
            printf "%s", out > tmp
        }' && mv -f "$tmp" "$OTHERS_STATE"
}
others_pct() {
    local ns=$(($(date +%s%N) - BENCH_T0))
    awk -v ns="$ns" -v cpus="$(nproc)" -v hz="$(getconf CLK_TCK)" '
        { used += $4 - $3 }
        END { printf "%.0f\n", (ns > 0 ? 100 * used / hz / (ns / 1e9 * cpus) : 0) }' "$OTHERS_STATE" 2>/dev/null || echo "?"
}
others_sample || true
( while sleep 1; do others_sample || true; done ) &
OTHERS_PID=$!

# bg_start NAME CMD [ARG...]: runs CMD in the background, stdout to
# $BENCH_TMP/NAME.out, stderr to $BENCH_TMP/NAME.err; sets BG_PID.
bg_start() {
    local name=$1
    shift
    "$@" >"$BENCH_TMP/$name.out" 2>"$BENCH_TMP/$name.err" &
    BG_PID=$!
    BENCH_PIDS+=("$BG_PID")
}

# bg_start_group NAME CMD [ARG...]: bg_start in a process group of its own
# (setsid): stopping it stops every process it started, also those no longer
# its children (a hot restart's new master, nginx's workers).
bg_start_group() {
    local name=$1
    shift
    setsid "$@" >"$BENCH_TMP/$name.out" 2>"$BENCH_TMP/$name.err" &
    BG_PID=$!
    BENCH_PIDS+=("$BG_PID")
    BENCH_GROUP[$BG_PID]=1
    echo "$BG_PID" >>"$BENCH_GROUPS_FILE"
}

# bg_forget_stop PID...: stops those processes and forgets them.
bg_forget_stop() {
    local pid p keep
    for pid in "$@"; do
        bg_stop "$pid"
        keep=()
        for p in "${BENCH_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
        BENCH_PIDS=("${keep[@]}")
    done
}

# Shows the tail of a background process's stderr (after a failure).
bg_tail() { say "--- $1 stderr (last lines):"; tail -n 15 "$BENCH_TMP/$1.err" >&2 || true; }

# wait_line NAME PID REGEX [SECONDS]: polls NAME.out until a line matches
# REGEX; fails if PID exits first or the deadline passes.
wait_line() {
    local name=$1 pid=$2 re=$3 secs=${4:-$READY_TIMEOUT}
    local deadline=$((SECONDS + secs))
    until grep -Eq "$re" "$BENCH_TMP/$name.out" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            bg_tail "$name"
            die "$name (pid $pid) exited before printing /$re/"
        fi
        if ((SECONDS >= deadline)); then
            bg_tail "$name"
            die "$name (pid $pid): no /$re/ line within ${secs}s"
        fi
        sleep 0.05
    done
}
wait_ready() { wait_line "$1" "$2" '^ready' "${3:-$READY_TIMEOUT}"; }

# free_port [pair]: prints a port free on 127.0.0.1 (with "pair": an even P
# with P and P+1 both free). Without BENCH_PORT: picked at random below the
# kernel's ephemeral range so that the load clients' own outgoing ports never
# collide with it. With BENCH_PORT=B: the next ports counted up from B (B,
# B+1, ...; a pair starts even), skipping any that are taken. Either way
# checked by binding (no SO_REUSEADDR, so a port with TIME_WAIT leftovers is
# skipped).
# shellcheck disable=SC2120
free_port() {
    local next=""
    if [ -n "$BENCH_PORT" ]; then
        [[ $BENCH_PORT =~ ^[0-9]+$ ]] && ((BENCH_PORT >= 1 && BENCH_PORT <= 65000)) \
            || die "BENCH_PORT=$BENCH_PORT: give a base port from 1 to 65000"
        next=$(cat "$BENCH_TMP/next_port" 2>/dev/null || echo "$BENCH_PORT")
    fi
    local out
    out=$(python3 -c '
import random, socket, sys
pair = sys.argv[1] == "pair"
base = int(sys.argv[2]) if sys.argv[2] else None
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except Exception:
    lo = 32768
for i in range(1000):
    if base is not None:
        p = base + i
        if pair:
            p = base + (base & 1) + 2 * i
        if p + pair > 65535:
            break
    elif lo > 12000:
        p = random.randrange(10000, lo - 2)
    else:  # odd range set-up: let the kernel pick
        s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if pair and base is None:
        p &= ~1
    socks = []
    try:
        for q in ([p, p + 1] if pair else [p]):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", q))
    except OSError:
        if base is not None:
            print(f"bench: port {p} is taken; trying the next", file=sys.stderr)
        continue
    finally:
        for s in socks:
            s.close()
    print(p, p + 1 + pair)
    sys.exit(0)
sys.exit("no free port found" + (f" from BENCH_PORT={base} up" if base is not None else ""))
' "${1:-one}" "$next") || exit 1
    [ -z "$BENCH_PORT" ] || echo "${out#* }" >"$BENCH_TMP/next_port"
    echo "${out% *}"
}

# field LINE KEY: the value of KEY=value in a client summary line.
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }

# median N...: the median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1}
        END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# median_idx N...: the 0-based position, in the order given, of the median
# of the numbers (for an even count the upper of the two middle ones), so
# that the other figures of that same run can be reported with it.
median_idx() {
    local i
    for i in $(seq 0 $(($# - 1))); do printf '%s %s\n' "${@:i+1:1}" "$i"; done \
        | sort -g -k1,1 | awk '{ a[NR] = $2 } END { print (NR ? a[int(NR / 2) + 1] : 0) }'
}

# nth I WORD...: the I-th (0-based) of the words given.
nth() { local i=$1; shift; local a=("$@"); echo "${a[i]:-nan}"; }

# The calling script stores one sample per run in RES[IMPL,LOAD,METRIC]
# (space-separated, in run order; unquoted below: split the list).
# med IMPL LOAD METRIC: the median of those samples.
# mrun IMPL LOAD [METRIC]: the median run by METRIC (default rps).
# at IMPL LOAD METRIC RUN: that run's METRIC. Latencies and the other figures
# of a row come from the run whose throughput is the median, never from
# medians of separate runs.
# shellcheck disable=SC2086
med() { median ${RES[$1,$2,$3]}; }
# shellcheck disable=SC2086
mrun() { median_idx ${RES[$1,$2,${3:-rps}]}; }
# shellcheck disable=SC2086
at() { nth "$4" ${RES[$1,$2,$3]}; }

# ratio A B [DECIMALS]: A / B.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (b == 0) print "n/a"; else printf "%.*f\n", d, a / b }'; }

# int X: X rounded to an integer.
int() { awk -v x="$1" 'BEGIN { printf "%.0f\n", x }'; }

# verdict VALUE OP TARGET [LABEL]: "met" or "**missed**" (OP is >= or <=,
# or == for an exact count); a miss is recorded (LABEL: VALUE, target) for
# bench_publish, which then exits 1.
verdict() {
    local r
    r=$(awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
        num = (v ~ /^-?[0-9.]+([eE][-+]?[0-9]+)?$/)
        ok = num && ((op == ">=") ? (v + 0 >= t + 0) : (op == "==") ? (v + 0 == t + 0) : (v + 0 <= t + 0))
        print ok ? "met" : "**missed**" }')
    [ "$r" = met ] || printf '%s: %s (target %s %s)\n' "${4:-target}" "$1" "$2" "$3" >>"$MISSED"
    echo "$r"
}

# plot_point PANEL CATEGORY SERIES VALUE: one run's figure for the plot
# (scripts/bench-plot.sh: each PANEL a chart, CATEGORY its x axis).
plot_point() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RUNS_TSV"; }

# need_plot: fails early when gnuplot is missing (not after minutes of runs).
need_plot() {
    command -v gnuplot >/dev/null 2>&1 || die "gnuplot is missing: run 'make bench-deps' (Debian gnuplot-nox)"
}

# bench_publish NAME TITLE: the report the script wrote to $BENCH_TMP/report.md
# goes to stdout and bench/results/NAME.md, the runs to NAME.tsv and NAME.svg;
# then every missed target is named on stderr and the script exits 1.
bench_publish() {
    local name=$1 title=$2
    mkdir -p "$RESULTS_DIR"
    cat "$BENCH_TMP/report.md"
    cp "$BENCH_TMP/report.md" "$RESULTS_DIR/$name.md"
    { printf '# panel\tcategory\tseries\tvalue\n'; cat "$RUNS_TSV"; } >"$RESULTS_DIR/$name.tsv"
    if [ -s "$RUNS_TSV" ]; then
        "${BENCH_PLOTTER:-$ROOT/scripts/bench-plot.sh}" "$RESULTS_DIR/$name.tsv" "$RESULTS_DIR/$name.svg" "$title" \
            || die "plotting $RESULTS_DIR/$name.svg failed"
    fi
    say "bench: wrote $RESULTS_DIR/$name.md, $name.svg, $name.tsv"
    local o
    o=$(others_pct)
    if [ "$o" != "?" ] && [ "$o" -ge 5 ]; then
        say "bench: WARNING: other processes took $o% of the CPU time during the bench: the figures are skewed"
    fi
    if [ -s "$MISSED" ]; then
        while IFS= read -r l; do say "bench: TARGET MISSED: $l"; done <"$MISSED"
        exit 1
    fi
    say "bench: every target met"
}

# load LABEL CLIENT-ARGS...: one run of the Rust load client. Sets LOAD_LINE.
# Any non-zero exit, error or break fails the whole script.
load() {
    local label=$1 rc=0 errors breaks
    shift
    LOAD_LINE=$(timeout "$CLIENT_TIMEOUT" "$BIN" client "$@" 2>"$BENCH_TMP/client.err") || rc=$?
    errors=$(field "$LOAD_LINE" errors)
    breaks=$(field "$LOAD_LINE" breaks)
    if [ "$rc" -ne 0 ] || [ "${errors:-x}" != 0 ] || [ "${breaks:-0}" != 0 ]; then
        say "bench: FAILED: $label (client exit $rc): ${LOAD_LINE:-no summary line}"
        [ "$rc" -eq 124 ] && say "bench: the client ran longer than ${CLIENT_TIMEOUT}s"
        tail -n 10 "$BENCH_TMP/client.err" >&2 || true
        exit 1
    fi
    say "  $label: $LOAD_LINE"
}

# proc_kb FILE FIELD PID...: summed FIELD (kB) of /proc/PID/FILE over the
# live ones among PID...
proc_kb() {
    local file=$1 field=$2 pid sum=0 v
    shift 2
    for pid in "$@"; do
        v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/$file" 2>/dev/null || true)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
rss_kb() { proc_kb status VmRSS "$@"; }       # resident
pss_kb() { proc_kb smaps_rollup Pss "$@"; }   # shared pages split among their users

# settled READER PID...: READER's figure (rss_kb, pss_kb) for PID... once
# two readings 0.5 s apart agree within 0.5 % (at most 5 s).
settled() {
    local reader=$1 a b i
    shift
    a=$("$reader" "$@")
    for ((i = 0; i < 10; i++)); do
        sleep 0.5
        b=$("$reader" "$@")
        awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= a * 0.005) }' && break
        a=$b
    done
    echo "$b"
}

# socket_fds PID...: how many socket descriptors those processes hold.
socket_fds() {
    local pid n=0 c
    for pid in "$@"; do
        c=$(find "/proc/$pid/fd" -lname 'socket:*' 2>/dev/null | wc -l)
        n=$((n + c))
    done
    echo "$n"
}

# The machine line that heads each table.
machine_line() {
    local cpu
    cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    others_sample || true
    printf 'Machine: %s CPUs, %s, Linux %s, %s (CPUs %s%% busy just before the start; other processes took %s%% of the CPU time during the bench)\n' \
        "$(nproc)" "${cpu:-unknown CPU}" "$(uname -r)" "$(date -u '+%Y-%m-%d %H:%M UTC')" "${BENCH_BUSY0:-?}" "$(others_pct)"
}

# need_node: sets NODE to Node.js (/usr/bin/node or on PATH), installed
# from Debian when root; dies otherwise.
need_node() {
    NODE=$(command -v node || true)
    [ -n "$NODE" ] || { [ -x /usr/bin/node ] && NODE=/usr/bin/node; } || true
    if [ -z "$NODE" ]; then
        if [ "$(id -u)" = 0 ]; then
            say "bench: node is missing; installing Debian's nodejs"
            if ! { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >&2; }; then
                die "apt-get install nodejs failed"
            fi
            NODE=$(command -v node || echo /usr/bin/node)
        else
            die "node is missing; run: sudo apt-get install -y nodejs"
        fi
    fi
    [ -x "$NODE" ] || die "no usable node at $NODE"
}

need_bin() {
    local f
    for f in "$@"; do
        [ -x "$f" ] || die "$f is missing: run 'make build build/pair_epoll' first"
    done
}
