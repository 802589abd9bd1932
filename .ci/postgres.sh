#!/usr/bin/env bash
# Installs and starts a real PostgreSQL server on loopback for the store tests, then prints the
# URL they read from PLAIT_TEST_POSTGRES_URL. Needs root (CI runs as root); prints nothing and
# exits non-zero when the server cannot be had, so the caller decides.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster "$version" main start >/dev/null 2>&1 || pg_ctlcluster "$version" main status >/dev/null
su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'plait'\"" >/dev/null
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='plait_test'\"" | grep -q 1 \
  || su postgres -c "createdb plait_test"
echo "postgresql+psycopg://postgres:plait@127.0.0.1:5432/plait_test"
