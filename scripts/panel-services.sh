#!/usr/bin/env bash
# Services the panel's tests run against: a private PostgreSQL cluster (and, once rate limits
# use it, redis-server). Installs what is missing, starts what is not running, and exports
# MAMBA_TEST_POSTGRES_URL. Meant to be sourced by scripts/test.sh (run as root); sourcing it
# by hand gives a developer the same setup.
#
# Env: MAMBA_TEST_PG_PORT (default 55432), MAMBA_TEST_PG_DIR (default /var/tmp/mamba-test-pg)

mamba_pg_port=${MAMBA_TEST_PG_PORT:-55432}
mamba_pg_dir=${MAMBA_TEST_PG_DIR:-/var/tmp/mamba-test-pg}

mamba_pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(mamba_pg_bin)" ] || ! command -v pg_config >/dev/null; then
  echo "panel-services: installing PostgreSQL and libpq headers"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql libpq-dev >/dev/null
fi

mamba_start_postgres() {
  local bin
  bin=$(mamba_pg_bin)
  # The cluster belongs to the postgres user: the server refuses to run as root.
  if [ ! -f "$mamba_pg_dir/data/PG_VERSION" ]; then
    mkdir -p "$mamba_pg_dir"
    chown postgres:postgres "$mamba_pg_dir"
    su postgres -c "$bin/initdb -D '$mamba_pg_dir/data' -U postgres --auth=trust -E UTF8 >/dev/null"
  fi
  if ! su postgres -c "$bin/pg_ctl -D '$mamba_pg_dir/data' status" >/dev/null 2>&1; then
    # -w waits until the server accepts connections; tests never race its start.
    su postgres -c "$bin/pg_ctl -D '$mamba_pg_dir/data' -w -t 60 -l '$mamba_pg_dir/log' \
      -o \"-p $mamba_pg_port -k '$mamba_pg_dir' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300\" start" >/dev/null
  fi
}
mamba_start_postgres
export MAMBA_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:${mamba_pg_port}/postgres"
echo "panel-services: PostgreSQL at $MAMBA_TEST_POSTGRES_URL"

# The identity tests deliver real mail to an aiosmtpd sink they start themselves.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "panel-services: installing aiosmtpd"
  python3 -m pip install -q --disable-pip-version-check aiosmtpd
fi
