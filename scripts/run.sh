#!/usr/bin/env bash
# The main job: the panel on its embedded SQLite database, a local wings node enrolled in it
# over mutual TLS, a demo tenant, and a demo freeciv server created through the panel's API.
#
# Usage: scripts/run.sh            (Ctrl-C stops both; the game server keeps running)
# Env:   MAMBA_HOME  state folder (default ./.mamba), MAMBA_PANEL_PORT (8090),
#        MAMBA_NODE_PORT (8091, the panel's mTLS node listener), MAMBA_WINGS_PORT (8080),
#        MAMBA_WINGS_PUBLIC_PORT (8081), MAMBA_SFTP_PORT (2022), MAMBA_DEMO_PORT (5556),
#        MAMBA_PROFILE (release; dev reuses the test build)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
home=${MAMBA_HOME:-$repo/.mamba}
wings_port=${MAMBA_WINGS_PORT:-8080}
wings_public_port=${MAMBA_WINGS_PUBLIC_PORT:-8081}
sftp_port=${MAMBA_SFTP_PORT:-2022}
demo_port=${MAMBA_DEMO_PORT:-5556}
panel_port=${MAMBA_PANEL_PORT:-8090}
node_port=${MAMBA_NODE_PORT:-8091}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba/target}

[ "$(id -u)" -eq 0 ] || { echo "run.sh: run as root (wings drives Docker and owns server folders)" >&2; exit 1; }

bash scripts/images.sh freeciv
# MAMBA_PROFILE=dev reuses the test build (quicker to build, slower to run).
profile=${MAMBA_PROFILE:-release}
cargo build --profile "$profile" --locked -p mamba-wings -p mamba-panel
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug
mkdir -p "$home"
chmod 700 "$home"
panel="$CARGO_TARGET_DIR/$profile_dir/panel"
wings="$CARGO_TARGET_DIR/$profile_dir/wings"

# The panel: SQLite in $home, a master key made once and kept there, a first super-admin.
[ -s "$home/panel-master-key" ] || head -c 32 /dev/urandom | base64 >"$home/panel-master-key"
export PANEL_MASTER_KEY=$(cat "$home/panel-master-key")
export DATABASE_URL="sqlite://$home/panel.db"
export PANEL_HTTP__LISTEN="127.0.0.1:$panel_port" PANEL_HTTP__PUBLIC_URL="http://127.0.0.1:$panel_port"
export PANEL_NODE_LISTENER__LISTEN="127.0.0.1:$node_port"
export PANEL_NODE_LISTENER__PUBLIC_URL="https://127.0.0.1:$node_port"
"$panel" migrate >/dev/null
if [ ! -s "$home/panel-admin.txt" ]; then
  "$panel" admin create-user --email admin@mamba.localhost >"$home/panel-admin.txt"
  chmod 600 "$home/panel-admin.txt"
fi
"$panel" serve >"$home/panel.log" 2>&1 &
panel_pid=$!
wings_pid=""
trap 'kill -TERM $wings_pid $panel_pid 2>/dev/null; wait $wings_pid $panel_pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$panel_port/healthz" >/dev/null 2>&1 && break
  kill -0 $panel_pid 2>/dev/null || { cat "$home/panel.log" >&2; echo "run.sh: the panel exited" >&2; exit 1; }
  sleep 0.1
done

cat >"$home/wings.toml" <<TOML
[api]
listen = "127.0.0.1:$wings_port"
public_listen = "127.0.0.1:$wings_public_port"

[sftp]
listen = "127.0.0.1:$sftp_port"

[system]
data_dir = "$home/wings"
TOML

# The demo tenant and the local node, through the panel's own API; the node is enrolled once
# with a one-time token and talks to the panel over mutual TLS from then on.
enrolled=0
[ -s "$home/wings/pki/node.json" ] && enrolled=1
MAMBA_ENROLLED=$enrolled MAMBA_WINGS_PORT=$wings_port MAMBA_WINGS_PUBLIC_PORT=$wings_public_port \
  MAMBA_SFTP_PORT=$sftp_port MAMBA_DEMO_PORTS="$demo_port-$((demo_port + 40))" \
  python3 scripts/demo_setup.py "http://127.0.0.1:$panel_port" "$home/panel-admin.txt" "$home/demo.json"
if [ "$enrolled" = 0 ]; then
  enroll_token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["enrollment_token"])' "$home/demo.json")
  WINGS_ENROLL_TOKEN=$enroll_token "$wings" --config "$home/wings.toml" enroll \
    --panel "https://127.0.0.1:$node_port"
fi
tenant=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tenant"])' "$home/demo.json")

"$wings" --config "$home/wings.toml" >"$home/wings.log" 2>&1 &
wings_pid=$!
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$wings_public_port/healthz" >/dev/null 2>&1 && break
  kill -0 $wings_pid 2>/dev/null || { cat "$home/wings.log" >&2; echo "run.sh: wings exited" >&2; exit 1; }
  sleep 0.1
done

# The demo server: one API call, the same one the README shows.
password=$(sed -n 's/^password: *//p' "$home/panel-admin.txt")
token=$(curl -fsS "http://127.0.0.1:$panel_port/api/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"email\":\"admin@mamba.localhost\",\"password\":\"$password\",\"client\":\"api\"}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"]["access_token"])')
# Placement takes only nodes that have been heard from: wait for wings' first heartbeat.
node=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["node"])' "$home/demo.json")
for _ in $(seq 1 300); do
  curl -fsS -H "authorization: Bearer $token" "http://127.0.0.1:$panel_port/api/v1/admin/nodes/$node" \
    | grep -q '"connectivity":"online"' && break
  kill -0 $wings_pid 2>/dev/null || { cat "$home/wings.log" >&2; echo "run.sh: wings exited" >&2; exit 1; }
  sleep 0.1
done
servers="http://127.0.0.1:$panel_port/api/v1/tenants/$tenant/servers"
if ! curl -fsS -H "authorization: Bearer $token" "$servers?name=demo-freeciv" | grep -q '"demo-freeciv"'; then
  curl -fsS -H "authorization: Bearer $token" -H 'content-type: application/json' "$servers" \
    -d '{"name":"demo-freeciv","blueprint":"freeciv","variables":{"SERVER_IDENTITY":"mamba-demo","AI_PLAYERS":"3"}}' \
    >/dev/null
fi
status=""
for _ in $(seq 1 900); do
  status=$(curl -fsS -H "authorization: Bearer $token" "$servers?name=demo-freeciv" \
    | python3 -c 'import json,sys; print(next((s["status"] for s in json.load(sys.stdin)["items"] if s["name"]=="demo-freeciv"), ""))')
  [ "$status" = running ] && break
  sleep 0.2
done
cat <<MSG

Mamba panel is running at http://127.0.0.1:$panel_port (API docs: /api/v1/docs; log: $home/panel.log).
Its first super-admin's credentials are in $home/panel-admin.txt; the demo tenant is $tenant.
The local wings node is enrolled over mutual TLS (panel node listener 127.0.0.1:$node_port,
wings 127.0.0.1:$wings_port; browsers use 127.0.0.1:$wings_public_port; log: $home/wings.log).
Demo freeciv server: $status (game ports from $demo_port/tcp).

  TOKEN=\$(curl -s http://127.0.0.1:$panel_port/api/v1/auth/login -H 'content-type: application/json' \\
    -d '{"email":"admin@mamba.localhost","password":"<from panel-admin.txt>","client":"api"}' | jq -r .tokens.access_token)
  curl -H "authorization: Bearer \$TOKEN" $servers
  curl -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' $servers \\
    -d '{"name":"another-freeciv","blueprint":"freeciv"}'

Ctrl-C stops the panel and wings; game servers keep running and are reattached on the next start.
MSG
wait $wings_pid
