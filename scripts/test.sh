#!/usr/bin/env bash
# Install what the test suite needs, then run it through nox.
#   Debian packages: promtool and amtool/alertmanager (observability tests),
#   h2load (HTTP/2 load tool), redis-server (tests start their own instances).
#   PostgreSQL and Redis must be running on 127.0.0.1 (.ci/run starts them).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

python3 -m pip install -q --disable-pip-version-check nox
exec python3 -m nox -s tests -- "$@"
