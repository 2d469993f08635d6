#!/usr/bin/env bash
# PostgreSQL and Redis on their local ports, for `make run` and `make test` (so `.ci/run`): started if they are
# installed but not running; on a Debian machine without them, installed from the OS packages first (as root),
# or refused with one line that says what to install.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

missing=()
listening 5432 || command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
listening 6379 || command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
installed_postgres=0
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "ingest needs ${missing[*]}: install it (Debian, as root: apt-get install ${missing[*]}), or run it on 127.0.0.1 (PostgreSQL 5432, Redis 6379)" >&2
        exit 1
    fi
    echo "installing ${missing[*]} from the Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [[ " ${missing[*]} " == *" postgresql "* ]] && installed_postgres=1
fi

# A client may be missing where the server runs elsewhere (a container, say): then an open port will do.
postgres_ready() {
    if command -v pg_isready >/dev/null 2>&1; then pg_isready -q -h 127.0.0.1 -p 5432; else listening 5432; fi
}
redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1
    else listening 6379; fi
}

if [ "$installed_postgres" = 1 ]; then
    # A server this script has just installed, for development and CI: the default URL (user postgres, no
    # password, 127.0.0.1) must work, as it does on the project's machines. An existing server's
    # authentication is never changed.
    cluster=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$cluster/main/pg_hba.conf
    if ! grep -q '^host *all *all *127.0.0.1/32 *trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        echo "PostgreSQL $cluster: local TCP connections trusted ($hba), as for a development server" >&2
    fi
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload 2>/dev/null || true  # if the package started it
fi

if ! postgres_ready; then
    echo "starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
    for _ in $(seq 1 30); do postgres_ready && break; sleep 1; done
fi
postgres_ready || { echo "PostgreSQL did not start" >&2; exit 1; }

if ! redis_ready; then
    echo "starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 30); do redis_ready && break; sleep 1; done
fi
redis_ready || { echo "Redis did not start" >&2; exit 1; }
