#!/usr/bin/env bash
# make memcheck: valgrind's memcheck over
#   1. the unit tests (reactor, channel, fdpass, protocols, clients);
#   2. a set of integration tests with every handoff process under valgrind
#      (masters, workers, takeovers, pair servers): the tests run the binary
#      through HANDOFF_WRAP (tests/it/support.rs bin()) and valgrind follows
#      each exec (--trace-children);
#   3. two nodes relaying to each other, one remote worker SIGKILLed and
#      respawned, then a clean stop (scripted: the node tests' 1.5 s link
#      handshake timeout is too short for processes under valgrind); then
#      two nodes through etcd, with an etcd outage (scripts/memcheck-etcd.sh).
# Errors are counted in valgrind's XML output, one file per process: the
# tests end their servers with SIGKILL, which leaves no final summary, but
# valgrind writes each error out as it happens. Fails on any error in any
# process, or on a failed test. Leaks are not checked (killed processes).
#   MEMCHECK_TESTS="a b"   the integration tests of step 2 (exact names)
#   MEMCHECK_SUPP=FILE     valgrind suppressions (default .ci/valgrind.supp, if present)
source "$(dirname "$0")/bench-lib.sh"
die() { say "memcheck: $*"; exit 1; }
cd "$ROOT"
command -v valgrind >/dev/null || die "valgrind is not installed (make memcheck installs it)"

TESTS=${MEMCHECK_TESTS:-"
    cluster::ping_echoes_varied_json_values_exactly
    cluster::bad_requests_get_an_error_reply_and_the_connection_stays_usable
    cluster::oversized_frame_closes_only_that_connection
    cluster::thousand_pipelined_requests_answered_in_order
    cluster::shared_policy_serves
    restart::sigkill_of_the_old_master_mid_restart_keeps_every_connection
    restart::a_connection_that_cannot_move_is_cut_after_the_grace
    node_restart::a_restarted_node_stays_a_node_and_its_links_move
    restart_faults::a_300_kb_read_ahead_of_a_1_mb_frame_survives_a_restart
    restart_faults::after_every_successful_restart_the_port_serves_at_once
    pair::random_sizes_pipelined_then_eof
    pair::garbage_and_reset_clients_do_not_hurt
    pair::pair_launcher_runs_and_stops_both
    http::http_pipelining_and_chunked_bodies
    http::http_refusals_400_413_431_501_then_close
    http::http_restart_under_keepalive_load_fails_no_request
    service::shout_cluster_restart_moves_a_partial_line_and_the_session_state
    service::shout_pair_hands_the_count_over_on_every_hop
    metrics::a_restart_counts_restarts_and_moves_and_the_endpoint_moves_too
"}
SUPP=${MEMCHECK_SUPP:-.ci/valgrind.supp}
# --xml=yes turns leak checking back on; the two leak-kind options keep it off.
VG=(valgrind -q --leak-check=no --show-leak-kinds=none --errors-for-leak-kinds=none --error-exitcode=99)
[ -f "$SUPP" ] && VG+=("--suppressions=$ROOT/$SUPP")
OUT=$BENCH_TMP/vg
mkdir -p "$OUT"

# report NAME: counts the <error> records of $OUT/NAME.*.xml, prints each
# error (kind, text, first frames); fails if there is any.
report() {
    local errs=0 files=0 f n pid
    for f in "$OUT/$1".*.xml; do
        [ -f "$f" ] || continue
        files=$((files + 1))
        n=$(grep -c '<error>' "$f" || true)
        [ "$n" -gt 0 ] || continue
        errs=$((errs + n))
        pid=${f%.xml}
        pid=${pid##*.}
        say "memcheck: $n error(s) in pid $pid: $(grep -m1 -A3 '<argv>' "$f" | sed 's/<[^>]*>//g' | tr -s ' \n' ' ')"
        sed -n '/<error>/,/<\/error>/p' "$f" | awk '
            function val(tag) { sub(".*<" tag ">", ""); sub("</" tag ">.*", ""); return $0 }
            /<kind>/ { print "  " val("kind") }
            /<what>/ { print "    " val("what") }
            /<text>/ { print "    " val("text") }
            /<auxwhat>/ { print "    " val("auxwhat") }
            /<frame>/ { fn = file = line = "" }
            /<fn>/ { fn = val("fn") }
            /<file>/ { file = val("file") }
            /<line>/ { line = val("line") }
            /<\/frame>/ { print "      at " fn (file != "" ? " (" file ":" line ")" : "") }' | head -80 >&2
    done
    [ "$files" -gt 0 ] || die "no process of step '$1' ran under valgrind"
    [ "$errs" -eq 0 ] || die "$errs valgrind error(s) in step '$1'"
    say "memcheck: $1: $files process(es) under valgrind, 0 errors"
}

say "== memcheck 1/4: unit tests under valgrind"
cargo test --release --lib --no-run 2>"$OUT/build.log" || { cat "$OUT/build.log" >&2; exit 1; }
unit=$(sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))$/\1/p' "$OUT/build.log" | tail -1)
[ -x "$unit" ] || { cat "$OUT/build.log" >&2; die "no unit test binary in cargo's output"; }
"${VG[@]}" --xml=yes --xml-file="$OUT/unit.%p.xml" "$unit" -q
report unit

say "== memcheck 2/4: integration tests, every handoff process under valgrind"
cargo build --release -q --bins --examples
# The wrapper is a sh script: the quotes keep the skip patterns unexpanded.
# shellcheck disable=SC2086
HANDOFF_WRAP="${VG[*]} --trace-children=yes '--trace-children-skip=*/sh,*/dash,*/bash,*/sleep' --xml=yes --xml-file=$OUT/it.%p.xml" \
    cargo test --release --test it -q -- --exact --test-threads=2 $TESTS 2>&1 | tee "$OUT/it.log"
rm -f "$ROOT"/target/tmp/handoff-wrap-*.sh # the wrapper bin() wrote (its name hashes $OUT)
# A renamed test would silently match nothing: every name must have run.
ran=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$OUT/it.log" | tail -1)
[ "${ran:-0}" -eq "$(echo $TESTS | wc -w)" ] || die "ran ${ran:-0} of the $(echo $TESTS | wc -w) tests named in MEMCHECK_TESTS"
report it

say "== memcheck 3/4: two nodes relaying, a worker killed, stopped cleanly"
NVG=("${VG[@]}" --trace-children=yes --xml=yes --xml-file="$OUT/node.%p.xml")
PA=$(free_port)
PB=$(free_port)
start_node() { # start_node NAME PORT PEER=ADDR
    bg_start "node$1" "${NVG[@]}" "$BIN" node --name "$1" --port "$2" --workers 2 --dir "$BENCH_TMP/$1" \
        --peers "$3" --connect-timeout 30
}
start_node A "$PA" "B=127.0.0.1:$PB"
A_PID=$BG_PID
start_node B "$PB" "A=127.0.0.1:$PA"
B_PID=$BG_PID
wait_ready nodeA "$A_PID" 120
wait_ready nodeB "$B_PID" 120
load "A -> B:1" rpc --port "$PA" --conns 4 --requests 100 --relay B:1
load "B -> A:0" rpc --port "$PB" --conns 4 --requests 100 --relay A:0
load "pings at A" rpc --port "$PA" --conns 4 --requests 200
b1() { "$BIN" status --dir "$BENCH_TMP/B" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][1]["pid"])'; }
old=$(b1)
kill -KILL "$old"
for ((i = 0; i < 600; i++)); do
    new=$(b1)
    [ "$new" != 0 ] && [ "$new" != "$old" ] && break
    sleep 0.1
done
[ "$new" != "$old" ] || die "B's worker 1 was not respawned"
load "A -> B:1 after its respawn" rpc --port "$PA" --conns 4 --requests 50 --relay B:1
bg_forget_stop "$A_PID" "$B_PID"
report node
# Nodes finding each other through etcd (skipped without etcd).
source "$ROOT/scripts/memcheck-etcd.sh"

say "== memcheck 4/4: C workers (build/rpc_worker on libhandoff) under valgrind, with restarts"
cargo test --release --test it -q -- --ignored --exact cworker::rpc_worker_under_valgrind_has_no_memcheck_error \
    || die "the C worker under valgrind had errors (see above)"
say "memcheck: 0 valgrind errors"
