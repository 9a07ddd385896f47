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
#                  for a cluster, every node's name (nats-1, nats-2, nats-3)
#   --client NAME  a client certificate with this common name (repeatable); default: gateway
#   --days N       validity of the server and client certificates (default 825)
#
# Writes ca.pem (hand it to every client), ca-key.pem (keep it on this machine only), server.pem,
# server-key.pem, and client-NAME.pem / client-NAME-key.pem per client. Keys are ECDSA P-256 (cheap
# on a Raspberry Pi) and readable by their owner only. The server certificate also allows client use:
# cluster routes and leaf nodes present it to each other.
set -euo pipefail

out="$(dirname "$0")/certs"
servers=()
clients=()
days=825
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --server) servers+=("${2:?--server needs a name}"); shift 2 ;;
        --client) clients+=("${2:?--client needs a name}"); shift 2 ;;
        --days) days="${2:?--days needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "make-certs: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$days" in ''|*[!0-9]*) echo "make-certs: --days must be a whole number of days, not '$days'" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }
[ ${#servers[@]} -gt 0 ] || servers=(localhost 127.0.0.1 nats "$(hostname)")
[ ${#clients[@]} -gt 0 ] || clients=(gateway)
for name in "${clients[@]}"; do
    case "$name" in *[!A-Za-z0-9_.-]*|'') echo "make-certs: client name '$name' may hold only letters, digits, '.', '_' and '-'" >&2; exit 2 ;; esac
done

umask 077
if [ ! -d "$out" ]; then
    mkdir -p "$out"
    chmod 755 "$out"  # services running as other users (the containers) read certificates from it
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca-key.pem" ]; then
    key "$out/ca-key.pem"
    openssl req -new -x509 -sha256 -days 3650 -key "$out/ca-key.pem" -out "$out/ca.pem" \
        -subj "/O=hive-bus/CN=hive-bus local CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    echo "made CA $out/ca.pem"
fi

sign() { # sign NAME CSR EXTFILE OUT
    openssl x509 -req -sha256 -days "$days" -in "$2" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
        -CAcreateserial -CAserial "$out/ca.srl" -extfile "$3" -out "$4" 2>/dev/null
}

sans=()
for name in "${servers[@]}"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then sans+=("IP:$name"); else sans+=("DNS:$name"); fi
done
san_list="$(IFS=,; echo "${sans[*]}")"
key "$out/server-key.pem"
openssl req -new -key "$out/server-key.pem" -subj "/O=hive-bus/CN=${servers[0]}" -out "$tmp/server.csr"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
    "$san_list" >"$tmp/server.ext"
sign server "$tmp/server.csr" "$tmp/server.ext" "$out/server.pem"
echo "made server certificate $out/server.pem for $san_list"

for name in "${clients[@]}"; do
    key "$out/client-$name-key.pem"
    openssl req -new -key "$out/client-$name-key.pem" -subj "/O=hive-bus/CN=$name" -out "$tmp/client.csr"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' >"$tmp/client.ext"
    sign "$name" "$tmp/client.csr" "$tmp/client.ext" "$out/client-$name.pem"
    echo "made client certificate $out/client-$name.pem"
done
# certificates are public; keys stay readable by their owner only
chmod 644 "$out/ca.pem" "$out/server.pem"
for name in "${clients[@]}"; do chmod 644 "$out/client-$name.pem"; done
