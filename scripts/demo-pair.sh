#!/usr/bin/env bash
# make run: start a pair (ports 7000/7001, dir ./run), drive it with the Rust
# client in unary and stream modes, print the summaries, stop both servers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/handoff
PORTS=${PORTS:-7000,7001}
DIR=${DIR:-run}
P=${PORTS%%,*}

out=$(mktemp)
rm -f "$DIR"/*.log
$BIN pair --ports "$PORTS" --dir "$DIR" >"$out" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$out" && break; sleep 0.05; done
grep -q '^ready' "$out" || { echo "pair did not start" >&2; exit 1; }

echo "== unary: 100 connections x 1000 requests, one at a time"
$BIN client unary --port "$P" --conns 100 --requests 1000
echo "== stream: 100 connections x 1000 requests written at once"
$BIN client stream --port "$P" --conns 100 --requests 1000
echo "== stopping the pair; request logs (one line per request served)"
kill -TERM "$pid"
wait "$pid" || true
trap 'rm -f "$out"' EXIT
wc -l "$DIR"/*.log
