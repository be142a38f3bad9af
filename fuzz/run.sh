#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions (default 10 million) and prints libFuzzer's closing stats.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
for t in credential scope forwarded jwt token_form import_item; do
  echo "== $t ($RUNS runs)"
  start=$(date +%s)
  cargo +nightly fuzz run "$t" -- -runs="$RUNS" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==[0-9]+==ERROR|SUMMARY)" || true
  echo "   took $(( $(date +%s) - start )) s"
done
