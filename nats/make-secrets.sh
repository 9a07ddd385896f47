#!/usr/bin/env bash
# Random passwords for the hub's users: the server's side in secrets.conf, each client's in a file.
#
#   nats/make-secrets.sh [--dir DIR] [WORKER_NAME...]
#
# DIR (default: the directory of this script, /etc/nats on a Pi) gets, or has added to it:
#   secrets.conf          NATS variables read by accounts.conf: GATEWAY_PASSWORD, ADMIN_PASSWORD,
#                         WORKER_LOCAL_PASSWORD and WORKER_<NAME>_PASSWORD for each worker named here
#   site-secrets.conf     SITE_PASSWORD, read by leafnodes.conf (remote sites' leaf nodes)
#   passwords/<user>      the same password, alone on its line, for that client
#                         (HIVE_NATS_PASSWORD_FILE=.../passwords/gateway)
# Existing entries are kept, so run it again to add a worker. Both are readable by their owner only.
# A password in secrets.conf may be replaced by its bcrypt hash ("$2a$..."), kept in double quotes.
# Worker names that differ only in case or in '-' and '_' share one variable: the second is refused,
# as are the hub's own users (gateway, admin, site).
set -euo pipefail

usage() { echo "make-secrets: $1" >&2; exit 2; }
dir="$(dirname "$0")"
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] && [ -n "$2" ] || usage "--dir needs a directory (see --help)"; dir="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*) usage "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done
conf="$dir/secrets.conf"
variable() { echo "WORKER_$(echo "$1" | tr 'a-z-' 'A-Z_')_PASSWORD"; }
owner() { # owner VARIABLE: the worker whose password it is, when this directory knows
    local name file
    [ "$1" != WORKER_LOCAL_PASSWORD ] || { echo local; return; }
    if [ -f "$conf" ]; then  # the line above each worker's variable names it
        name="$(grep -B1 "^$1:" "$conf" | sed -n 's/^# worker //p' | head -1)"
        [ -z "$name" ] || { echo "$name"; return; }
    fi
    for file in "$dir"/passwords/*; do  # made before those lines were
        if [ -f "$file" ] && [ "$(variable "${file##*/}")" = "$1" ]; then echo "${file##*/}"; return; fi
    done
}
token='^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'
declare -A taken=()
for name in "$@"; do
    [[ "$name" =~ $token ]] || usage "worker name '$name' must be 1-64 letters, digits, '_' or '-'"
    case "${name,,}" in gateway|admin|site) usage "'$name' is one of the hub's own users (gateway, admin, site), not a worker name" ;; esac
    var="$(variable "$name")"
    other="${taken[$var]:-$(owner "$var")}"
    if [ -n "$other" ] && [ "$other" != "$name" ]; then
        usage "worker '$name' would share $var with worker '$other' (names that differ only in case or in '-' and '_' do): choose another name"
    fi
    taken[$var]="$name"
done
command -v openssl >/dev/null || { echo "make-secrets: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$dir/passwords"
[ -f "$conf" ] || printf '# Passwords of the hub users (nats/make-secrets.sh). Keep this file secret.\n' >"$conf"

add() { # add USER VARIABLE [CONF]
    local into="${3:-$conf}"
    if grep -q "^$2:" "$into"; then
        return
    fi
    local pw
    pw="$(openssl rand -hex 24)"
    if [[ "$2" == WORKER_* ]]; then printf '# worker %s\n' "$1" >>"$into"; fi
    printf '%s: "%s"\n' "$2" "$pw" >>"$into"
    printf '%s\n' "$pw" >"$dir/passwords/$1"
    echo "made a password for $1: $dir/passwords/$1"
}

add gateway GATEWAY_PASSWORD
add admin ADMIN_PASSWORD
add local WORKER_LOCAL_PASSWORD
# a NATS config may not hold a variable it never uses: the sites' password has a file of its own
sites="$dir/site-secrets.conf"
[ -f "$sites" ] || printf '# Password of the remote sites user (nats/make-secrets.sh). Keep this file secret.\n' >"$sites"
add site SITE_PASSWORD "$sites"
for name in "$@"; do
    add "$name" "$(variable "$name")"
done
