#!/usr/bin/env bash
# `make run`: migrate, make a project and a token, then serve the API with a worker beside it.
# HOST, PORT and TLS=1 (a self-signed certificate for 127.0.0.1, which the testmo CLI needs) adjust it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
host=${HOST:-127.0.0.1}
port=${PORT:-8000}

ingest db upgrade
project=$(ingest admin project create default --exist-ok)
token=$(ingest admin token create --user admin --project "$project")

scheme=http
tls=()
if [ "${TLS:-0}" = 1 ]; then
    scripts/make-cert.sh .run "$host"
    scheme=https
    tls=(--tls-cert .run/cert.pem --tls-key .run/key.pem)
fi

ingest worker --metrics-host 127.0.0.1 &
worker=$!
trap 'kill "$worker" 2>/dev/null; wait "$worker" 2>/dev/null' EXIT

cat <<BANNER

  API      $scheme://$host:$port/api/v1
  project  $project
  token    $token

  curl -H "Authorization: Bearer $token" $scheme://$host:$port/api/v1/projects/$project/automation/runs
BANNER
if [ "$scheme" = https ]; then
    echo "  testmo CLI: NODE_EXTRA_CA_CERTS=$PWD/.run/cert.pem TESTMO_TOKEN=$token testmo automation:run:submit --instance https://$host:$port --project-id $project ..."
fi
echo
ingest api --host "$host" --port "$port" "${tls[@]}"
