#!/usr/bin/env bash
# The one command that runs every check: installs what the tests need, builds the game images
# if their recipes changed, then rustfmt, clippy and all tests (unit, integration against real
# Docker and real game servers, workspace checks).
#
# Env: CARGO_TARGET_DIR  reused between runs (default ~/.cache/mamba/target, outside the clone)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n==> %s\n' "$*"; }

step "prerequisites"
command -v docker >/dev/null || { echo "test.sh: docker is required" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "test.sh: the Docker engine is not reachable" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: run as root (the tests read container cgroups and build images with debootstrap)" >&2
  exit 1
fi

step "python test clients (websockets, rcon) and the S3 server (moto, boto3)"
# Real clients in another process: the console socket's and an independent RCON client.
python3 -c 'import websockets, rcon' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'websockets>=14,<18' 'rcon>=2.4,<3'
# The backup tests start moto's S3 server (python3 -m moto.server) and check what wings
# stored with boto3, an S3 client independent of wings'.
python3 -c 'import moto.server, boto3, flask_cors' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'moto[server]>=5,<6' 'boto3>=1.34,<2'

step "SFTP clients (OpenSSH sftp and sshd, sshfs, paramiko)"
bash scripts/sftp-tools.sh

# --- panel services (PostgreSQL, and the tools the panel's tests use) ---------------------
step "panel services"
# shellcheck source=scripts/panel-services.sh
source scripts/panel-services.sh
# --- end panel services -------------------------------------------------------------------

step "game images (rebuilt only when a recipe changes)"
bash scripts/images.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Before cargo test, so that the run still closes with cargo's own summary lines.
step "schemathesis against the panel's OpenAPI document"
bash scripts/schemathesis.sh

step "cargo test"
cargo test --workspace --locked --no-fail-fast
