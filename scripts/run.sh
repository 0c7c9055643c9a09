#!/usr/bin/env bash
# The main job: the panel (on its embedded SQLite database) and a local wings node with a demo
# freeciv server. Until nodes join the panel (next on the roadmap), wings is driven over its own
# HTTP API and the panel holds accounts, tenants, roles and API keys.
#
# Usage: scripts/run.sh            (Ctrl-C stops both; the game server keeps running)
# Env:   MAMBA_HOME  state folder (default ./.mamba), MAMBA_WINGS_PORT (8080),
#        MAMBA_PANEL_PORT (8090), MAMBA_DEMO_PORT (5556)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
home=${MAMBA_HOME:-$repo/.mamba}
wings_port=${MAMBA_WINGS_PORT:-8080}
demo_port=${MAMBA_DEMO_PORT:-5556}
panel_port=${MAMBA_PANEL_PORT:-8090}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba/target}

[ "$(id -u)" -eq 0 ] || { echo "run.sh: run as root (wings drives Docker and owns server folders)" >&2; exit 1; }
python3 -c 'import yaml' 2>/dev/null || pip install -q pyyaml

bash scripts/images.sh freeciv
cargo build --release --locked -p mamba-wings -p mamba-panel
mkdir -p "$home"
chmod 700 "$home"
[ -s "$home/token" ] || head -c 32 /dev/urandom | base64 | tr -d '/+=' >"$home/token"
token=$(cat "$home/token")
cat >"$home/wings.toml" <<TOML
[api]
listen = "127.0.0.1:$wings_port"
token = "$token"

[system]
data_dir = "$home/wings"
TOML

# The panel: SQLite in $home, a master key made once and kept there, a first super-admin.
[ -s "$home/panel-master-key" ] || head -c 32 /dev/urandom | base64 >"$home/panel-master-key"
export PANEL_MASTER_KEY=$(cat "$home/panel-master-key")
export DATABASE_URL="sqlite://$home/panel.db"
export PANEL_HTTP__LISTEN="127.0.0.1:$panel_port" PANEL_HTTP__PUBLIC_URL="http://127.0.0.1:$panel_port"
panel="$CARGO_TARGET_DIR/release/panel"
"$panel" migrate >/dev/null
if [ ! -s "$home/panel-admin.txt" ]; then
  "$panel" admin create-user --email admin@mamba.localhost >"$home/panel-admin.txt"
  chmod 600 "$home/panel-admin.txt"
fi
"$panel" serve >"$home/panel.log" 2>&1 &
panel_pid=$!

"$CARGO_TARGET_DIR/release/wings" --config "$home/wings.toml" &
wings_pid=$!
trap 'kill -TERM $wings_pid $panel_pid 2>/dev/null; wait $wings_pid $panel_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$panel_port/healthz" >/dev/null 2>&1 && break
  kill -0 $panel_pid 2>/dev/null || { cat "$home/panel.log" >&2; echo "run.sh: the panel exited" >&2; exit 1; }
  sleep 0.1
done
api="http://127.0.0.1:$wings_port"
for _ in $(seq 1 100); do
  curl -fsS "$api/healthz" >/dev/null 2>&1 && break
  kill -0 $wings_pid 2>/dev/null || { echo "run.sh: wings exited" >&2; exit 1; }
  sleep 0.1
done
auth="Authorization: Bearer $token"
if ! curl -fsS -H "$auth" "$api/api/servers/demo-freeciv" >/dev/null 2>&1; then
  python3 - "$demo_port" <<'PY' | curl -fsS -H "$auth" -H 'content-type: application/json' --data-binary @- "$api/api/servers" >/dev/null
import json, sys, yaml
blueprint = yaml.safe_load(open("blueprints/freeciv.yaml"))
print(json.dumps({
    "id": "demo-freeciv",
    "blueprint": blueprint,
    "variables": {"SERVER_IDENTITY": "mamba-demo", "AI_PLAYERS": "3"},
    "allocations": {"default": {"ip": "0.0.0.0", "port": int(sys.argv[1])}},
    "start_on_completion": True,
}))
PY
fi
state=""
for _ in $(seq 1 600); do
  state=$(curl -fsS -H "$auth" "$api/api/servers/demo-freeciv" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = running ] && break
  sleep 0.2
done
cat <<MSG

Mamba panel is running at http://127.0.0.1:$panel_port (API docs: /api/v1/docs; log: $home/panel.log).
Its first super-admin's credentials are in $home/panel-admin.txt.

  curl -s http://127.0.0.1:$panel_port/api/v1/auth/login -H 'content-type: application/json' \\
       -d '{"email":"admin@mamba.localhost","password":"<from panel-admin.txt>","client":"api"}'

Mamba wings is running at $api (state in $home).
Demo freeciv server: $state, game port $demo_port/tcp (connect a freeciv client to this host).

  export TOKEN=\$(cat $home/token)
  curl -H "Authorization: Bearer \$TOKEN" $api/api/servers/demo-freeciv
  curl -H "Authorization: Bearer \$TOKEN" "$api/api/servers/demo-freeciv/logs?lines=20"
  curl -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
       -d '{"commands":["list"]}' $api/api/servers/demo-freeciv/commands
  curl -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
       -d '{"action":"stop"}' $api/api/servers/demo-freeciv/power

Ctrl-C stops the panel and wings; the game server keeps running and is reattached on the next start.
MSG
wait $wings_pid
