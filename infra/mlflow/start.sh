#!/usr/bin/env bash
# A team MLflow tracking server: PostgreSQL backend store + an artifact store, bound to 127.0.0.1.
#
#   infra/mlflow/start.sh [STATE_DIR]        # default .mlflow-server/; Ctrl-C stops both
#
# Environment: MLFLOW_HOST (127.0.0.1; 0.0.0.0 exposes it — put auth in front first), MLFLOW_PORT (5000),
# PG_PORT (5433), ARTIFACTS (STATE_DIR/artifacts, or s3://bucket/mlflow with AWS_* / MLFLOW_S3_ENDPOINT_URL),
# MLFLOW (the mlflow executable, default .venv/bin/mlflow or mlflow on PATH).
# Needs Debian's `postgresql` package (apt-get install postgresql) and psycopg2 (pip install '.[infra]').
# Clients then use MLFLOW_TRACKING_URI=http://127.0.0.1:5000.
set -euo pipefail

STATE=$(realpath -m "${1:-.mlflow-server}")
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
PG_PORT=${PG_PORT:-5433}
ARTIFACTS=${ARTIFACTS:-$STATE/artifacts}
MLFLOW=${MLFLOW:-$( [ -x .venv/bin/mlflow ] && echo .venv/bin/mlflow || command -v mlflow || true )}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$PG_BIN" ]; then
  echo "error: PostgreSQL not found under /usr/lib/postgresql; install it: apt-get install postgresql" >&2
  exit 2
fi
if [ -z "$MLFLOW" ]; then
  echo "error: mlflow not found; run make setup (or set MLFLOW=/path/to/mlflow)" >&2
  exit 2
fi

# PostgreSQL refuses to run as root: run its commands as the `postgres` user then (STATE_DIR's parents must
# be searchable by that user: /tmp or /srv, not /root).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

mkdir -p "$STATE/pg" "$STATE/sock"
[[ "$ARTIFACTS" == *://* ]] || mkdir -p "$ARTIFACTS"
if [ "$(id -u)" = 0 ]; then chown -R postgres "$STATE/pg" "$STATE/sock"; chmod 700 "$STATE/pg"; fi
if [ ! -f "$STATE/pg/PG_VERSION" ]; then
  as_pg "$PG_BIN/initdb" -D "$STATE/pg" -U mlflow --auth=trust >"$STATE/initdb.log"
fi
as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg" -l "$STATE/sock/postgres.log" -w \
  -o "-p $PG_PORT -k $STATE/sock -c listen_addresses=127.0.0.1" start >/dev/null
trap 'as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg" -m fast stop >/dev/null || true' EXIT  # until the server runs
as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
  || as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow

echo "MLflow on http://$HOST:$PORT (backend postgresql://mlflow@127.0.0.1:$PG_PORT/mlflow, artifacts $ARTIFACTS)"
setsid "$MLFLOW" server --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow" \
  --artifacts-destination "$ARTIFACTS" --host "$HOST" --port "$PORT" --workers 1 &
SERVER=$!  # its own process group: stopping it stops its web workers too
stop() {
  trap - EXIT INT TERM
  kill -TERM -- -"$SERVER" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -"$SERVER" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg" -m fast stop >/dev/null || true
}
trap stop EXIT INT TERM
wait "$SERVER"
