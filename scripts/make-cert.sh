#!/usr/bin/env bash
# A self-signed certificate for a host (an IP address or a name): scripts/make-cert.sh DIR HOST
set -euo pipefail
dir=$1
host=$2
mkdir -p "$dir"
[ -s "$dir/cert.pem" ] && [ -s "$dir/key.pem" ] && exit 0
if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -keyout "$dir/key.pem" -out "$dir/cert.pem" \
    -subj "/CN=$host" -addext "subjectAltName=$san" 2>/dev/null
