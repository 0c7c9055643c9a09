#!/usr/bin/env bash
# SFTP throughput of wings against OpenSSH's own sftp-server, side by side in one run.
#
# Starts, on loopback: a private sshd (its own config, host key and port; sftp subsystem =
# /usr/lib/openssh/sftp-server) and wings (release build) with one server to log into. Then,
# with OpenSSH's `sftp -b` as the client for both, times the upload (`put`) and download
# (`get`) of one file (1 GiB of random bytes by default), alternating which server goes first
# in each round, and reports the median throughput of each and the ratio wings / OpenSSH.
# Both servers write into the same filesystem (under the work folder).
#
# Usage, from the repository root, as root:
#   scripts/bench/sftp.sh [--size-mib 1024] [--rounds 3] [--wings PATH]
# Needs Docker with mamba/testbox:latest (scripts/images.sh) and scripts/sftp-tools.sh.
# The wings binary defaults to $CARGO_TARGET_DIR/release/wings
# (cargo build --release -p mamba-wings --bin wings --example dev_enroll). wings is enrolled
# with a throwaway CA and called as the panel over mutual TLS (scripts/bench/wings_dev.py).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
size_mib=1024
rounds=3
target=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba/target}
wings_bin=$target/release/wings
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --wings) wings_bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$wings_bin" ] || { echo "no wings binary at $wings_bin (cargo build --release -p mamba-wings)" >&2; exit 1; }
[ -x /usr/lib/openssh/sftp-server ] && [ -x /usr/sbin/sshd ] || bash "$repo/scripts/sftp-tools.sh"

work=$(mktemp -d /var/tmp/mamba-sftp-bench.XXXXXX)
pids=()
server_id=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$server_id" ]; then
    docker rm -f "mamba-$server_id" "mamba-install-$server_id" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
log() { echo "sftp bench: $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}

ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/client_key"
log "writing a ${size_mib} MiB file of random bytes"
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$work/payload.bin"

# --- the baseline: OpenSSH's sshd with its own sftp-server --------------------------------
mkdir -p /run/sshd "$work/openssh-root"
ssh-keygen -q -t ed25519 -N '' -f "$work/sshd_host_key"
cp "$work/client_key.pub" "$work/authorized_keys"
sshd_port=$(free_port)
cat > "$work/sshd_config" <<EOF
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $work/sshd_host_key
PidFile $work/sshd.pid
AuthorizedKeysFile $work/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel ERROR
EOF
/usr/sbin/sshd -D -f "$work/sshd_config" -E "$work/sshd.log" &
pids+=($!)

# --- wings, with one server to log into ----------------------------------------------------
api_port=$(free_port)
public_port=$(free_port)
sftp_port=$(free_port)
dev=$repo/scripts/bench/wings_dev.py
python3 "$dev" enroll "$work/wings-data" "$work/client"
server_id="sftpbench-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
short=${server_id:0:8}
cat > "$work/credentials.toml" <<EOF
[[users]]
name = "bench"
authorized_keys = ["$(cat "$work/client_key.pub")"]
[users.servers]
"$server_id" = ["*"]
EOF
cat > "$work/wings.toml" <<EOF
[api]
listen = "127.0.0.1:$api_port"
public_listen = "127.0.0.1:$public_port"
[system]
data_dir = "$work/wings-data"
[sftp]
listen = "127.0.0.1:$sftp_port"
credentials_file = "$work/credentials.toml"
EOF
"$wings_bin" --config "$work/wings.toml" > "$work/wings.log" 2>&1 &
pids+=($!)
api() { python3 "$dev" call "$work/client" "$@"; }
wait_for "wings" api GET "https://127.0.0.1:$api_port/healthz"
python3 - "$repo/wings/tests/fixtures/testbox.yaml" "$server_id" "$(free_port)" "$((size_mib * 3 + 512))" > "$work/create.json" <<'EOF'
import json, sys, yaml
blueprint = yaml.safe_load(open(sys.argv[1]))
print(json.dumps({
    "id": sys.argv[2], "blueprint": blueprint, "variables": {},
    "allocations": {"default": {"ip": "127.0.0.1", "port": int(sys.argv[3])}},
    "limits": {"memory_mb": 128, "cpu_percent": 100, "disk_mb": int(sys.argv[4]), "pids": 64},
    "start_on_completion": False,
}))
EOF
api POST "https://127.0.0.1:$api_port/api/servers" "$work/create.json" >/dev/null
installed() { api GET "https://127.0.0.1:$api_port/api/servers/$server_id" | grep -q '"status":"installed"'; }
wait_for "the server's install" installed
wait_for "sshd" bash -c "echo > /dev/tcp/127.0.0.1/$sshd_port"

ssh_opts=(-i "$work/client_key" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no
  -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR)
# One transfer: server (openssh|wings), direction (put|get); prints milliseconds.
transfer() {
  local server=$1 direction=$2 port login remote local_copy start end
  if [ "$server" = openssh ]; then
    port=$sshd_port login=root remote=$work/openssh-root/payload.bin
  else
    port=$sftp_port login=bench.$short remote=/payload.bin
  fi
  local_copy=$work/down-$server.bin
  local command="put $work/payload.bin $remote"
  [ "$direction" = get ] && command="get $remote $local_copy"
  start=$(date +%s%N)
  echo "$command" | sftp -q -b - -P "$port" "${ssh_opts[@]}" "$login@127.0.0.1" >/dev/null
  end=$(date +%s%N)
  echo $(((end - start) / 1000000))
}

cipher() { # the cipher the client negotiated with a server
  # The first value given wins in ssh, so DEBUG1 goes before the options' LogLevel=ERROR.
  echo "pwd" | sftp -b - -P "$1" -o LogLevel=DEBUG1 "${ssh_opts[@]}" "$2@127.0.0.1" 2>&1 \
    | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1
}
openssh_cipher=$(cipher "$sshd_port" root)
wings_cipher=$(cipher "$sftp_port" "bench.$short")

declare -A times
for round in $(seq 1 "$rounds"); do
  order=(openssh wings)
  [ $((round % 2)) -eq 0 ] && order=(wings openssh)
  for direction in put get; do
    for server in "${order[@]}"; do
      ms=$(transfer "$server" "$direction")
      times[$server.$direction]+="$ms "
      log "round $round: $server $direction ${ms} ms"
    done
  done
  if [ "$round" = 1 ]; then
    cmp "$work/payload.bin" "$work/down-openssh.bin"
    cmp "$work/payload.bin" "$work/down-wings.bin"
    cmp "$work/payload.bin" "$work/wings-data/volumes/$server_id/payload.bin"
  fi
done

python3 - "$size_mib" "$rounds" "$openssh_cipher" "$wings_cipher" \
  "${times[openssh.put]}" "${times[wings.put]}" "${times[openssh.get]}" "${times[wings.get]}" <<'EOF'
import statistics, sys
size, rounds, c_openssh, c_wings = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
runs = [list(map(int, a.split())) for a in sys.argv[5:9]]
rate = lambda ms: size / (statistics.median(ms) / 1000)
o_put, w_put, o_get, w_get = (rate(r) for r in runs)
print(f"SFTP over loopback, {size} MiB file, median of {rounds} rounds (OpenSSH sftp -b as the client)\n")
print("| direction | OpenSSH sftp-server | wings | wings / OpenSSH |")
print("|---|---|---|---|")
print(f"| upload (put) | {o_put:.0f} MiB/s | {w_put:.0f} MiB/s | {w_put / o_put:.2f}x |")
print(f"| download (get) | {o_get:.0f} MiB/s | {w_get:.0f} MiB/s | {w_get / o_get:.2f}x |")
print(f"\nciphers negotiated: OpenSSH {c_openssh}, wings {c_wings}")
print("raw ms (OpenSSH put, wings put, OpenSSH get, wings get):", runs)
EOF
