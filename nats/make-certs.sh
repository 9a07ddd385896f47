#!/usr/bin/env bash
# A private CA and the certificates a first hive-bus set-up needs, made with openssl.
#
#   nats/make-certs.sh [--out DIR] [--server NAME]... [--client NAME]... [--days N]
#
#   --out DIR      where the files go (default: nats/certs); an existing CA there is reused, so more
#                  clients can be added later without touching the certificates already handed out
#   --server NAME  a DNS name or IP address the server certificate is valid for (repeatable); default:
#                  localhost, 127.0.0.1, nats (the compose service) and this machine's host name.
#                  Add every name workers use to reach the hub (pi.example.org, its public IP...) and,
#                  for a cluster, every node's name (nats-1, nats-2, nats-3). An existing server
#                  certificate is kept unless --server is given: then it is replaced (reload nats-server)
#   --client NAME  a client certificate with this common name (repeatable); default: gateway, when
#                  DIR has no client-gateway.pem yet. A client named here is made anew
#   --days N       validity of the server and client certificates (default 825)
#
# Writes ca.pem (hand it to every client), ca-key.pem (keep it on this machine only), server.pem,
# server-key.pem, and client-NAME.pem / client-NAME-key.pem per client. Keys are ECDSA P-256 (cheap
# on a Raspberry Pi) and readable by their owner only. The server certificate also allows client use:
# cluster routes and leaf nodes present it to each other. Nothing is written unless all of it is made.
set -euo pipefail

usage() { echo "make-certs: $1 (see --help)" >&2; exit 2; }
value() { # value OPTION [VALUE...]: the option's value, or a usage message
    [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || usage "$1 needs a value"
}

out="$(dirname "$0")/certs"
servers=()
clients=()
days=825
while [ $# -gt 0 ]; do
    case "$1" in
        --out) value "$@"; out="$2"; shift 2 ;;
        --server) value "$@"; servers+=("$2"); shift 2 ;;
        --client) value "$@"; clients+=("$2"); shift 2 ;;
        --days) value "$@"; days="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage "unknown argument '$1'" ;;
    esac
done
case "$days" in *[!0-9]*) usage "--days must be a whole number of days, not '$days'" ;; esac
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }

is_ipv4() {
    local IFS=. octets o
    [[ "$1" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    read -ra octets <<<"$1"
    for o in "${octets[@]}"; do [ "$((10#$o))" -le 255 ] || return 1; done
}
is_ipv6() { [[ "$1" =~ ^[0-9A-Fa-f:.]{2,45}$ && "$1" == *:*:* ]]; }
is_dns() { # letters, digits and '-' in labels of up to 63, 253 in all; a leading '*.' for a wildcard
    local label='[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    [ ${#1} -le 253 ] && [[ "$1" =~ ^(\*\.)?$label(\.$label)*$ ]] && [[ ! "$1" =~ ^[0-9.]+$ ]]
}

explicit_server=${#servers[@]}
if [ ${#servers[@]} -eq 0 ]; then
    servers=(localhost 127.0.0.1 nats)
    ! is_dns "$(hostname)" || servers+=("$(hostname)")
fi
sans=()
for name in "${servers[@]}"; do
    if is_ipv4 "$name" || is_ipv6 "$name"; then sans+=("IP:$name")
    elif is_dns "$name"; then sans+=("DNS:$name")
    else usage "server name '$name' is neither a DNS name (letters, digits, '-' and dots) nor an IP address"
    fi
done
if [ ${#clients[@]} -eq 0 ] && [ ! -f "$out/client-gateway.pem" ]; then clients=(gateway); fi
for name in "${clients[@]}"; do
    case "$name" in *[!A-Za-z0-9_.-]*) usage "client name '$name' may hold only letters, digits, '.', '_' and '-'" ;; esac
done

umask 077
if [ ! -d "$out" ]; then
    mkdir -p "$out"
    chmod 755 "$out"  # services running as other users (the containers) read certificates from it
fi
# everything is made here first, and moved into place only once all of it is made
tmp="$(mktemp -d "$out/.make-certs.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

run() { # run WHAT COMMAND...: openssl, with its complaint shown only when it fails
    "${@:2}" 2>"$tmp/openssl.err" || { echo "make-certs: openssl could not make $1:" >&2; cat "$tmp/openssl.err" >&2; exit 1; }
}
key() { run "a key" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

ca="$out"
made_ca=""
if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca-key.pem" ]; then
    ca="$tmp"
    key "$tmp/ca-key.pem"
    run "the CA" openssl req -new -x509 -sha256 -days 3650 -key "$tmp/ca-key.pem" -out "$tmp/ca.pem" \
        -subj "/O=hive-bus/CN=hive-bus local CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    made_ca=1
fi
[ ! -f "$out/ca.srl" ] || cp "$out/ca.srl" "$tmp/ca.srl"

sign() { # sign WHAT CSR EXTFILE OUT
    run "$1" openssl x509 -req -sha256 -days "$days" -in "$2" -CA "$ca/ca.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -extfile "$3" -out "$4"
}

san_list="$(IFS=,; echo "${sans[*]}")"
made=()
said=()
if [ "$explicit_server" -gt 0 ] || [ -n "$made_ca" ] || [ ! -f "$out/server.pem" ] || [ ! -f "$out/server-key.pem" ]; then
    key "$tmp/server-key.pem"
    run "the server request" openssl req -new -key "$tmp/server-key.pem" -subj "/O=hive-bus/CN=${servers[0]}" -out "$tmp/server.csr"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
        "$san_list" >"$tmp/server.ext"
    sign "the server certificate" "$tmp/server.csr" "$tmp/server.ext" "$tmp/server.pem"
    made+=(server-key.pem server.pem)
    if [ -f "$out/server.pem" ]; then
        said+=("replaced the server certificate $out/server.pem, now for $san_list (reload nats-server to use it)")
    else
        said+=("made server certificate $out/server.pem for $san_list")
    fi
else
    said+=("kept the server certificate $out/server.pem (give --server to make a new one)")
fi

for name in "${clients[@]}"; do
    key "$tmp/client-$name-key.pem"
    run "the request of client $name" openssl req -new -key "$tmp/client-$name-key.pem" -subj "/O=hive-bus/CN=$name" -out "$tmp/client.csr"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$tmp/client.ext"
    sign "the certificate of client $name" "$tmp/client.csr" "$tmp/client.ext" "$tmp/client-$name.pem"
    made+=("client-$name-key.pem" "client-$name.pem")
    said+=("made client certificate $out/client-$name.pem")
done

# certificates are public; keys stay readable by their owner only
for file in "${made[@]}"; do case "$file" in *-key.pem) ;; *) chmod 644 "$tmp/$file" ;; esac; done
if [ -n "$made_ca" ]; then
    chmod 644 "$tmp/ca.pem"
    made=(ca-key.pem ca.pem "${made[@]}")
    said=("made CA $out/ca.pem" "${said[@]}")
fi
[ ! -f "$tmp/ca.srl" ] || made+=(ca.srl)
# a file made anew keeps the owner of the one it replaces: after `chown -R nats: /etc/nats`, a server
# key that root makes again must stay readable by the nats user (it reads it at reload and start)
for file in "${made[@]}"; do
    [ ! -e "$out/$file" ] || chown --reference="$out/$file" "$tmp/$file" 2>/dev/null || true
done
for file in "${made[@]}"; do mv -f "$tmp/$file" "$out/$file"; done
printf '%s\n' "${said[@]}"
