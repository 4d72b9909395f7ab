# shellcheck shell=bash
# Shared helpers for scripts/bench-pair.sh and scripts/bench-cluster.sh.
# Sourced, not run. Servers bind 127.0.0.1 on ports picked free at run time;
# every process started through bg_start is stopped on exit (trap EXIT), even
# when the script fails. Progress goes to stderr, the result table to stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release/handoff
RUNS=${RUNS:-3}                        # measured runs per load and server
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-60}   # seconds one load-client run may take
READY_TIMEOUT=${READY_TIMEOUT:-15}     # seconds a server gets to print "ready"

BENCH_TMP=$(mktemp -d "${TMPDIR:-/tmp}/handoff-bench.XXXXXX")
BENCH_PIDS=()

say() { printf '%s\n' "$*" >&2; }
die() { say "bench: $*"; exit 1; }

# Stops one background process: SIGTERM, up to 8 s (a cluster master gives
# its workers a 5 s grace), then SIGKILL.
bg_stop() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "bench: pid $pid ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do
        bg_stop "${BENCH_PIDS[i]}"
    done
    rm -rf "$BENCH_TMP"
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bg_start NAME CMD [ARG...]: runs CMD in the background, stdout to
# $BENCH_TMP/NAME.out, stderr to $BENCH_TMP/NAME.err; sets BG_PID.
bg_start() {
    local name=$1
    shift
    "$@" >"$BENCH_TMP/$name.out" 2>"$BENCH_TMP/$name.err" &
    BG_PID=$!
    BENCH_PIDS+=("$BG_PID")
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
# with P and P+1 both free). Picked below the kernel's ephemeral range so that
# the load clients' own outgoing ports never collide with it; checked by
# binding (no SO_REUSEADDR, so a port with TIME_WAIT leftovers is skipped).
# shellcheck disable=SC2120
free_port() {
    python3 -c '
import random, socket, sys
pair = sys.argv[1:] == ["pair"]
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except Exception:
    lo = 32768
for _ in range(1000):
    if lo > 12000:
        p = random.randrange(10000, lo - 2)
    else:  # odd range set-up: let the kernel pick
        s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if pair:
        p &= ~1
    socks = []
    try:
        for q in ([p, p + 1] if pair else [p]):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", q))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(p)
    sys.exit(0)
sys.exit("no free port found")
' "$@"
}

# field LINE KEY: the value of KEY=value in a client summary line.
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }

# median N...: the median of the numbers given.
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1}
        END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# med IMPL LOAD METRIC: the median of the space-separated samples the
# calling script stored in RES[IMPL,LOAD,METRIC] (unquoted: split the list).
# shellcheck disable=SC2086
med() { median ${RES[$1,$2,$3]}; }

# ratio A B [DECIMALS]: A / B.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (b == 0) print "n/a"; else printf "%.*f\n", d, a / b }'; }

# int X: X rounded to an integer.
int() { awk -v x="$1" 'BEGIN { printf "%.0f\n", x }'; }

# verdict VALUE OP TARGET: "met" or "**missed**" (OP is >= or <=).
verdict() {
    awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
        ok = (op == ">=") ? (v >= t) : (v <= t)
        print ok ? "met" : "**missed**" }'
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

# rss_kb PID...: summed VmRSS (kB) of the live ones among PID...
rss_kb() {
    local pid sum=0 v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
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
    printf 'Machine: %s CPUs, %s, Linux %s, %s\n' "$(nproc)" "${cpu:-unknown CPU}" "$(uname -r)" \
        "$(date -u '+%Y-%m-%d %H:%M UTC')"
}

need_bin() {
    local f
    for f in "$@"; do
        [ -x "$f" ] || die "$f is missing: run 'make build build/pair_epoll' first"
    done
}
