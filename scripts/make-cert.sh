#!/usr/bin/env bash
# A self-signed certificate for a host (an IP address or a name): scripts/make-cert.sh DIR HOST
set -euo pipefail
dir=$1
host=$2
mkdir -p "$dir"
[ -s "$dir/cert.pem" ] && [ -s "$dir/key.pem" ] && exit 0
if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
# An EC key: a TLS handshake costs the server a fraction of an RSA one, and the testmo CLI opens a new
# connection for every request.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj "/CN=$host" -addext "subjectAltName=$san" 2>/dev/null
