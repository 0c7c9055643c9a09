#!/usr/bin/env bash
# Metrics ingest (issue 6): simulated nodes (default 50 nodes x 1,000 servers = the 50,000
# servers the issue plans for) each send one batch per 30 s round into the panel's data
# layer (metrics_store::ingest_batch: ownership check, idempotent insert, rollup
# bookkeeping), all at once, on SQLite and on PostgreSQL; next to it in the same run the
# baseline: the same rows as plain multi-row INSERTs into a table without keys. Reports
# samples/s, CPU (cores) per 1,000 samples/s for the panel process and for the PostgreSQL
# backends, the ratios, and one rollup of what was ingested. Prints a Markdown table for
# docs/BENCHMARKS.md. Run from anywhere, as root (PostgreSQL comes from
# scripts/panel-services.sh).
#
# Env: NODES (default 50), SERVERS per node (default 1000), ROUNDS (default 4),
#      CARGO_TARGET_DIR.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
nodes=${NODES:-50}
servers=${SERVERS:-1000}
rounds=${ROUNDS:-4}
target=${CARGO_TARGET_DIR:-$repo/target}

# shellcheck source=/dev/null
source scripts/panel-services.sh >/dev/null
cargo build --locked -q -p mamba-panel --example metrics_bench
bench="$target/debug/examples/metrics_bench"

dir=$(mktemp -d)
pg_db="mamba_bench_metrics_$$"
pg_base=${MAMBA_TEST_POSTGRES_URL%/*}
cleanup() {
  rm -rf "$dir"
  psql -q "$MAMBA_TEST_POSTGRES_URL" -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql -q "$MAMBA_TEST_POSTGRES_URL" -c "CREATE DATABASE $pg_db" >/dev/null

echo "Run at $(date -u '+%Y-%m-%d %H:%M:%S') UTC; nproc $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg); $nodes nodes x $servers servers, $rounds rounds of one batch per node, all nodes at once; debug build (dependencies at opt-level 1)."
echo
echo "| Backend | Baseline: plain INSERT samples/s | Data layer samples/s | Ratio | Panel cores per 1,000 samples/s (baseline) | PostgreSQL cores per 1,000 samples/s (baseline) | CPU ratio | Cores at 1,700 samples/s: panel (+ PostgreSQL) | Re-delivery of one round | Rollup |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for run in "sqlite sqlite://$dir/bench.db" "postgres $pg_base/$pg_db"; do
  set -- $run
  line=$("$bench" --label "$1" --url "$2" --nodes "$nodes" --servers "$servers" --rounds "$rounds")
  python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
sqlite = r['backend'] == 'sqlite'
pg = "n/a (in-process)" if sqlite else f"{r['store_db_cores_per_1000']} ({r['baseline_db_cores_per_1000']})"
at = f"{r['store_panel_cores_per_1000'] * 1.7:.3f}" + ("" if sqlite else f" (+{r['store_db_cores_per_1000'] * 1.7:.3f})")
print(f"| {r['backend']} | {r['baseline_per_s']:.0f} | {r['store_per_s']:.0f} | {r['ratio']}x | {r['store_panel_cores_per_1000']} ({r['baseline_panel_cores_per_1000']}) | {pg} | {r['cpu_ratio']}x | {at} | {r['redelivery_s']} s, 0 stored | {r['rollup_hours']} server-hours from {r['samples']} samples in {r['rollup_s']} s |")
PY
done
