#!/usr/bin/env bash
# Backup and restore figures beside `tar | gzip -1` and `tar | zstd -T0`, in one run.
# Prints the Markdown tables recorded in docs/BENCHMARKS.md.
# Env: BENCH_ROUNDS (default 3), BENCH_DIR (work folder, default a temporary one in /var/tmp).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
for tool in tar gzip zstd; do
  command -v "$tool" >/dev/null || { echo "backup.sh: $tool is required (apt-get install $tool)" >&2; exit 1; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba/target}
exec cargo bench -p mamba-wings --bench backup
