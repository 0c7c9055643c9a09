#!/usr/bin/env bash
# Fuzzes a running panel from its own OpenAPI document with schemathesis: no answer may be a
# 5xx or break the documented schema. Runs once anonymously and once as a logged-in
# super-admin who owns a tenant. Called by scripts/test.sh; needs `st` (pip schemathesis).
#
# Env: CARGO_TARGET_DIR (where `panel` is built), MAMBA_SCHEMATHESIS_PORT (default 18090)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
port=${MAMBA_SCHEMATHESIS_PORT:-18090}
base="http://127.0.0.1:$port"

cargo build --locked -q -p mamba-panel --bin panel
dir=$(mktemp -d)
export PANEL_MASTER_KEY
PANEL_MASTER_KEY=$(head -c 32 /dev/urandom | base64)
export DATABASE_URL="sqlite://$dir/panel.db" PANEL_HTTP__LISTEN="127.0.0.1:$port"
# The node listener's routes (/api/node/v1/...) are documented (tag `node`) but served only on
# that listener with a node's client certificate, so the runs below leave them out; the
# listener only needs a free port.
export PANEL_NODE_LISTENER__LISTEN="127.0.0.1:$((port + 1))"
export PANEL_AUTH__ARGON2_MEMORY_KIB=8192 PANEL_AUTH__ARGON2_ITERATIONS=1

password=$("$target/debug/panel" admin create-user --email fuzz@example.test | sed -n 's/^password: //p')
"$target/debug/panel" serve >"$dir/panel.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -sf "$base/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "$base/readyz" >/dev/null || { cat "$dir/panel.log"; echo "schemathesis.sh: the panel did not start" >&2; exit 1; }

token=$(curl -sf "$base/api/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"fuzz@example.test\",\"password\":\"$password\",\"client\":\"api\"}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"]["access_token"])')
curl -sf "$base/api/v1/tenants" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"slug":"fuzzed","name":"Fuzzed"}' >/dev/null

run() {
  st run "$base/api/v1/openapi.json" --url "$base" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples 25 --generation-deterministic "$@"
}
# One --exclude-path-regex per run: a second one replaces the first.
run --exclude-path-regex '^/api/node/'
# Logged in. Logging out (and two-factor changes, which need codes) would end or block the
# session for the rest of the run, so they are left to the anonymous run above.
run -H "Authorization: Bearer $token" \
  --exclude-path /api/v1/auth/logout --exclude-path-regex '^/api/node/|/two-factor/'

