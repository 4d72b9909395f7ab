#!/usr/bin/env bash
# make demo-nodes: three nodes (A, B, C) on 127.0.0.1 with two workers each;
# clients relay messages between every pair of workers; prints the link
# table of each node; stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/handoff
BASE=${BASE_PORT:-7200}
DIR=${DIR:-run/nodes}
declare -A PORT=([A]=$BASE [B]=$((BASE + 1)) [C]=$((BASE + 2)))
pids=()
outs=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -f "${outs[@]}"' EXIT

for n in A B C; do
  peers=""
  for m in A B C; do [ "$m" = "$n" ] || peers="$peers${peers:+,}$m=127.0.0.1:${PORT[$m]}"; done
  out=$(mktemp); outs+=("$out")
  $BIN node --name "$n" --port "${PORT[$n]}" --workers 2 --dir "$DIR/$n" --peers "$peers" >"$out" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^ready' "$out" && break; sleep 0.05; done
  grep -q '^ready' "$out" || { echo "node $n did not start" >&2; exit 1; }
done

echo "== relays: from each node's workers (clients land round-robin) to every worker of every node"
for n in A B C; do
  for m in A B C; do
    for w in 0 1; do
      printf '%s -> %s:%s  ' "$n" "$m" "$w"
      $BIN client rpc --port "${PORT[$n]}" --conns 2 --requests 100 --relay "$m:$w"
    done
  done
done
for n in A B C; do
  echo "== node $n"
  $BIN status --dir "$DIR/$n"
done
