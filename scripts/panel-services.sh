#!/usr/bin/env bash
# Services the panel's tests run against: a private PostgreSQL cluster, a private
# redis-server and the aiosmtpd SMTP sink. Installs what is missing, starts what is not
# running, and exports MAMBA_TEST_POSTGRES_URL and MAMBA_TEST_REDIS_URL. Meant to be sourced by scripts/test.sh (run as root); sourcing it
# by hand gives a developer the same setup.
#
# Env: MAMBA_TEST_PG_PORT (default 55432), MAMBA_TEST_PG_DIR (default /var/tmp/mamba-test-pg),
#      MAMBA_TEST_REDIS_PORT (default 56379)

mamba_pg_port=${MAMBA_TEST_PG_PORT:-55432}
mamba_pg_dir=${MAMBA_TEST_PG_DIR:-/var/tmp/mamba-test-pg}

mamba_pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(mamba_pg_bin)" ] || ! command -v pg_config >/dev/null; then
  echo "panel-services: installing PostgreSQL and libpq headers"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq postgresql libpq-dev >/dev/null
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

# The identity tests deliver real mail to an aiosmtpd sink they start themselves;
# scripts/schemathesis.sh fuzzes the API with schemathesis.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "panel-services: installing aiosmtpd"
  python3 -m pip install -q --disable-pip-version-check aiosmtpd
fi
if ! command -v st >/dev/null || ! python3 -c 'import schemathesis' 2>/dev/null; then
  echo "panel-services: installing schemathesis"
  python3 -m pip install -q --disable-pip-version-check schemathesis
fi

# A private redis-server for the rate-limit tests that run with Redis.
mamba_redis_port=${MAMBA_TEST_REDIS_PORT:-56379}
if ! command -v redis-server >/dev/null; then
  echo "panel-services: installing redis-server"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq redis-server >/dev/null
fi
if ! redis-cli -p "$mamba_redis_port" ping >/dev/null 2>&1; then
  redis-server --port "$mamba_redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --logfile "$mamba_pg_dir/redis.log" >/dev/null
  # Wait for it to answer rather than for a guessed time.
  for _ in $(seq 1 100); do
    redis-cli -p "$mamba_redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$mamba_redis_port" ping >/dev/null || { echo "panel-services: redis-server did not start" >&2; exit 1; }
fi
export MAMBA_TEST_REDIS_URL="redis://127.0.0.1:${mamba_redis_port}/0"
echo "panel-services: Redis at $MAMBA_TEST_REDIS_URL"
