#!/usr/bin/env bash
# The runs behind bench/RESULTS.md. Usage: bench/campaign.sh GROUP... (see the case below).
# Each run writes bench/out/r/<group>-<n>.json; `python -m bench.medians` summarises them.
# Needs PostgreSQL and Redis on loopback for the *-pg groups.
set -euo pipefail
cd "$(dirname "$0")/.."
PG=${PQMSG_BENCH_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/pqmsg_bench}
REDIS=redis://127.0.0.1:6379/0
RUNS=${RUNS:-3}
OUT=bench/out/r
mkdir -p "$OUT"
B="python -m bench --spawn --no-progress --warmup 1"

reset_pg() {  # a fresh database per PostgreSQL run: queued rows from earlier runs would skew it
  psql -q "${PG%/*}/postgres" -c "DROP DATABASE IF EXISTS ${PG##*/} WITH (FORCE)" -c "CREATE DATABASE ${PG##*/}"
}

run() {  # run NAME ARGS...: RUNS runs of one configuration
  local name=$1; shift
  for i in $(seq 1 "$RUNS"); do
    if [[ " $* " == *" --database-url "* ]]; then reset_pg; fi
    python -m bench.quiet --below "${QUIET_BELOW:-40}" --max-wait "${QUIET_WAIT_S:-90}" >&2
    echo "== $name #$i: $*" >&2
    $B "$@" --json "$OUT/$name-$i.json" > "$OUT/$name-$i.txt" 2>&1 || echo "run $name-$i exited $?" >&2
  done
}

for group in "$@"; do
  case $group in
    send-sqlite) run send-sqlite --scenario send --duration 15 --concurrency 32 --connections 2 --baseline ;;
    send-pg) run send-pg --scenario send --duration 15 --concurrency 32 --connections 2 --baseline \
               --database-url $PG --redis-url $REDIS ;;
    send-sqlite-stock) run send-sqlite-stock --scenario send --duration 15 --concurrency 32 --connections 2 --baseline \
               --floor-hypercorn stock ;;
    send-pg-stock) run send-pg-stock --scenario send --duration 15 --concurrency 32 --connections 2 --baseline \
               --floor-hypercorn stock --database-url $PG --redis-url $REDIS ;;
    send-sqlite-inline) PQMSG_VERIFY_PROCESSES=0 run send-sqlite-inline --scenario send --duration 15 --concurrency 32 \
               --connections 2 --baseline ;;
    send-pg-inline) PQMSG_VERIFY_PROCESSES=0 run send-pg-inline --scenario send --duration 15 --concurrency 32 \
               --connections 2 --baseline --database-url $PG --redis-url $REDIS ;;
    send-pg-w2) run send-pg-w2 --scenario send --duration 15 --concurrency 32 --connections 4 --baseline \
               --workers 2 --database-url $PG --redis-url $REDIS ;;
    send-sqlite-w2) run send-sqlite-w2 --scenario send --duration 15 --concurrency 32 --connections 4 \
               --baseline --workers 2 ;;
    peak-sqlite) run peak-sqlite --scenario mixed --duration 15 --concurrency 32 --accounts 40 ;;
    open80-sqlite) run open80-sqlite --scenario mixed --duration 15 --concurrency 256 --accounts 40 --rate "$RATE80" ;;
    open-sqlite) run "open${RATE}-sqlite" --scenario mixed --duration 15 --concurrency 256 --accounts 40 --rate "$RATE" ;;
    open40-sqlite) run open40-sqlite --scenario mixed --duration 15 --concurrency 256 --accounts 40 --rate "$RATE40" ;;
    open40-stream-sqlite) run open40-stream-sqlite --scenario mixed --receive stream --duration 15 --concurrency 256 \
               --accounts 40 --rate "$RATE40" ;;
    open80-stream-sqlite) run open80-stream-sqlite --scenario mixed --receive stream --duration 15 --concurrency 256 \
               --accounts 40 --rate "$RATE80" ;;
    peak-stream-sqlite) run peak-stream-sqlite --scenario mixed --receive stream --duration 15 --concurrency 32 --accounts 40 ;;
    peak-pg) run peak-pg --scenario mixed --duration 15 --concurrency 32 --accounts 40 \
               --database-url $PG --redis-url $REDIS ;;
    open80-pg) run open80-pg --scenario mixed --duration 15 --concurrency 256 --accounts 40 --rate "$RATE80" \
               --database-url $PG --redis-url $REDIS ;;
    backlog1k-sqlite) run backlog1k-sqlite --scenario backlog --duration 10 --concurrency 4 --accounts 20 --fetch-limit 1 --prefill 1000 ;;
    backlog1m-sqlite) run backlog1m-sqlite --scenario backlog --duration 10 --concurrency 4 --accounts 20 --fetch-limit 1 --prefill 1000000 ;;
    backlog1k-pg) run backlog1k-pg --scenario backlog --duration 10 --concurrency 4 --accounts 20 --fetch-limit 1 --prefill 1000 \
               --database-url $PG --redis-url $REDIS ;;
    backlog1m-pg) run backlog1m-pg --scenario backlog --duration 10 --concurrency 4 --accounts 20 --fetch-limit 1 --prefill 1000000 \
               --database-url $PG --redis-url $REDIS ;;
    harness-httpx) run harness-httpx --scenario send --duration 15 --concurrency 32 --connections 2 --baseline \
               --client httpx --huffman ;;
    harness-lean) run harness-lean --scenario send --duration 15 --concurrency 32 --connections 2 --baseline ;;
    polls1k) run polls1k --idle-polls 1000 --accounts 50 ;;
    polls10k) run polls10k --idle-polls 10000 --accounts 100 ;;
    streams1k) run streams1k --idle-streams 1000 ;;
    streams10k) run streams10k --idle-streams 10000 ;;
    *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done
