#!/usr/bin/env bash
# Allocation under contention (issue 6): servers placed per second (capacity check + one
# port + server row + audit entry, atomically) by 50 concurrent clients, on SQLite and on
# PostgreSQL, next to the baseline of the same shape in the same run: the same 50 clients
# each committing single-row INSERT transactions. Prints a Markdown table for
# docs/BENCHMARKS.md. Run from anywhere, as root (PostgreSQL comes from
# scripts/panel-services.sh).
#
# Env: CLIENTS (default 50), OPS (per client, default 40), CARGO_TARGET_DIR.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
clients=${CLIENTS:-50}
ops=${OPS:-40}
target=${CARGO_TARGET_DIR:-$repo/target}

# shellcheck source=/dev/null
source scripts/panel-services.sh >/dev/null
cargo build --locked -q -p mamba-panel --example allocation_bench
bench="$target/debug/examples/allocation_bench"

dir=$(mktemp -d)
pg_db="mamba_bench_$$"
pg_base=${MAMBA_TEST_POSTGRES_URL%/*}
cleanup() {
  rm -rf "$dir"
  psql -q "$MAMBA_TEST_POSTGRES_URL" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql -q "$MAMBA_TEST_POSTGRES_URL" -c "CREATE DATABASE $pg_db" >/dev/null

echo "Run at $(date -u '+%Y-%m-%d %H:%M:%S') UTC; nproc $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg); $clients clients x $ops operations each; debug build (dependencies at opt-level 1)."
echo
echo "| Backend | Baseline: single-row INSERT transactions/s | Placements/s, one node | Ratio | Placements/s, spread over 10 nodes | Ratio | Placed (all distinct ports) |"
echo "|---|---|---|---|---|---|---|"
for run in "sqlite sqlite://$dir/bench.db" "postgres $pg_base/$pg_db"; do
  set -- $run
  line=$("$bench" --label "$1" --url "$2" --clients "$clients" --ops "$ops")
  python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"| {r['backend']} | {r['baseline_per_s']} | {r['reservations_per_s']} | {r['ratio']}x | {r['spread_per_s']} | {r['spread_ratio']}x | {r['reservations'] + r['spread_reservations']} ({r['distinct_ports']}) |")
PY
done
