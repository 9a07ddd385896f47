#!/usr/bin/env bash
# The secrets compose.yaml mounts, made once on the hub: deploy/make-secrets.sh [--dir DIR]
#
#   gateway-tokens          bearer tokens of the gateway's API, one per line (HIVE_GATEWAY_TOKENS_FILE)
#   metrics-token           the token of GET /metrics: the gateway (HIVE_METRICS_TOKEN_FILE) and
#                           Prometheus's scrape job both read it
#   grafana-admin-password  Grafana's admin password (GF_SECURITY_ADMIN_PASSWORD__FILE)
#
# Existing files are kept. The directory is its owner's only (0700); the files the Prometheus and
# Grafana containers read (they run as users of their own) are 0644 inside it: compose mounts each
# file by itself, so the directory keeps everyone else out on the host.
set -euo pipefail

dir="$(dirname "$0")/secrets"
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "make-secrets: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
command -v openssl >/dev/null || { echo "make-secrets: openssl is not installed" >&2; exit 1; }

mkdir -p "$dir"
chmod 700 "$dir"
make() { # make FILE MODE
    if [ -s "$dir/$1" ]; then
        return
    fi
    (umask 077 && openssl rand -hex 24 >"$dir/$1")
    chmod "$2" "$dir/$1"
    echo "made $dir/$1"
}
make gateway-tokens 600
make metrics-token 644
make grafana-admin-password 644
