# Sourced by scripts/memcheck.sh (uses its VG, OUT, BIN, report and
# bench-lib's helpers): two nodes finding each other through etcd, under
# valgrind; etcd killed and started again (outage, reconnect, new lease);
# node B stopped cleanly (key deleted) while A keeps relaying; A stopped.
# The etcd client (libevent's evhttp, src/core/reactor/http_client.rs) runs
# in the masters. Skipped, saying so, when etcd is not installed.
if ! command -v etcd >/dev/null; then
    say "memcheck: etcd is not installed (make deps installs etcd-server): skipping the etcd step"
else
    EVG=("${VG[@]}" --trace-children=yes --xml=yes --xml-file="$OUT/etcd.%p.xml")
    EC=$(free_port)
    EPEER=$(free_port)
    EURL=http://127.0.0.1:$EC
    start_etcd() {
        rm -rf "$BENCH_TMP/etcd-data"
        bg_start etcd etcd --data-dir "$BENCH_TMP/etcd-data" --listen-client-urls "$EURL" \
            --advertise-client-urls "$EURL" --listen-peer-urls "http://127.0.0.1:$EPEER" \
            --initial-advertise-peer-urls "http://127.0.0.1:$EPEER" --initial-cluster "default=http://127.0.0.1:$EPEER"
        ETCD_PID=$BG_PID
        for ((i = 0; i < 100; i++)); do
            curl -sf "$EURL/health" >/dev/null && return 0
            sleep 0.1
        done
        die "etcd did not answer on $EURL"
    }
    # etcd_state NODE: the node's etcd state, and its member names.
    etcd_state() {
        "$BIN" status --dir "$BENCH_TMP/e$1" --json 2>/dev/null | python3 -c \
            'import json,sys; v=json.load(sys.stdin); print(v["etcd"]["state"], *sorted(m["name"] for m in v["members"]))'
    }
    wait_state() { # wait_state NODE "STATE NAMES..."
        for ((i = 0; i < 600; i++)); do
            [ "$(etcd_state "$1")" = "$2" ] && return 0
            sleep 0.1
        done
        die "node $1: etcd state and members are '$(etcd_state "$1")', not '$2'"
    }
    # warm PORT NODE:W: one relay until it succeeds (the first link set-up
    # under valgrind may outlast the client's 5 s request timeout).
    warm() {
        for ((i = 0; i < 20; i++)); do
            line=$(timeout 60 "$BIN" client rpc --port "$1" --conns 1 --requests 1 --relay "$2" 2>/dev/null) || true
            [ "$(field "$line" errors)" = 0 ] && return 0
        done
        die "no relay from port $1 to $2 succeeded"
    }
    start_etcd
    EA=$(free_port)
    EB=$(free_port)
    for n in A B; do
        port=EA; [ $n = B ] && port=EB
        bg_start "enode$n" "${EVG[@]}" "$BIN" node --name $n --port "${!port}" --workers 2 --dir "$BENCH_TMP/e$n" \
            --etcd "$EURL" --etcd-ttl 3 --connect-timeout 30
        eval "E${n}_PID=$BG_PID"
    done
    wait_ready enodeA "$EA_PID" 120
    wait_ready enodeB "$EB_PID" 120
    wait_state A "connected A B"
    wait_state B "connected A B"
    warm "$EA" B:1
    load "A -> B:1 (found in etcd)" rpc --port "$EA" --conns 4 --requests 100 --relay B:1
    bg_forget_stop "$ETCD_PID"
    wait_state A "unreachable A B"
    warm "$EA" B:0
    load "A -> B:0 while etcd is down" rpc --port "$EA" --conns 4 --requests 50 --relay B:0
    start_etcd
    wait_state A "connected A B"
    wait_state B "connected A B"
    bg_forget_stop "$EB_PID"
    wait_state A "connected A"
    load "pings at A after B left" rpc --port "$EA" --conns 2 --requests 50
    bg_forget_stop "$EA_PID" "$ETCD_PID"
    report etcd
fi
