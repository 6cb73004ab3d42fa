#!/usr/bin/env bash
# The example app on a machine that may lack the system libraries: installs libhiredis-dev,
# libsqlite3-dev and pkg-config when missing, then runs the example (`Examples/`, the `chat` product) with `runserver` and any
# arguments given (default: http://127.0.0.1:8000/, in-memory layer, workers in process).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists hiredis 2>/dev/null || missing+=(libhiredis-dev)
pkg-config --exists sqlite3 2>/dev/null || missing+=(libsqlite3-dev)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "==> installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec swift run --package-path Examples chat runserver "$@"
