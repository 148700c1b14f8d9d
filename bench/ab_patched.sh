#!/usr/bin/env bash
# A/B of proposals 4 and 5b (bench/patched_serve.py) against the plain server, alternating.
# Usage: bench/ab_patched.sh sqlite|pg [PAIRS]; results in bench/out/ab/. Needs PostgreSQL and Redis for pg.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out/ab
export PQMSG_RATE_REGISTRATION=10000/10000 PQMSG_RATE_SEND=100000/100000 PQMSG_RATE_BUNDLE=100000/100000 PQMSG_LOG_LEVEL=WARNING PQMSG_AUDIT_KEY=$(printf '0%.0s' {1..64})
DB=$1; PAIRS=${2:-3}
PG=postgresql://postgres@127.0.0.1:5432/pqmsg_bench
for i in $(seq 1 $PAIRS); do for v in plain patched; do
  rm -rf bench/out/ab/data
  if [ $DB = pg ]; then psql -q postgresql://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS pqmsg_bench WITH (FORCE)" -c "CREATE DATABASE pqmsg_bench"; export PQMSG_DATABASE_URL=$PG PQMSG_REDIS_URL=redis://127.0.0.1:6379/0; fi
  if [ $v = plain ]; then cmd="-m pqmsg"; else cmd="bench/patched_serve.py"; fi
  python $cmd serve --bind 127.0.0.1:8310 --data-dir bench/out/ab/data > bench/out/ab/server-$v.log 2>&1 & SP=$!
  sleep 4; python -m bench.quiet --below 40 --max-wait 20
  python -m bench --url http://127.0.0.1:8310 --server-pid $SP --scenario send --duration 15 --concurrency 32 --connections 2 --no-progress --json bench/out/ab/$DB-$v-$i.json > bench/out/ab/$DB-$v-$i.txt 2>&1
  kill $SP; wait $SP
done; done
