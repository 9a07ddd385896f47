#!/usr/bin/env bash
# Print the nats-server user block of one worker credential, with least-privilege permissions.
#
#   nats/worker-user.sh [--prefix hive] [--nkey UPUBLICKEY] NAME PROVIDER [PROVIDER...]
#
# Paste the block into the users list of the HIVE account in nats/accounts.conf (below the line
# "worker users"), then reload the server (nats-server --signal reload, or systemctl reload nats).
# The worker runs with HIVE_WORKER_NAME=NAME (or `hive worker --name NAME`): its heartbeat keys are
# NAME.<...> and its reply inboxes _INBOX.NAME.<...>, and these permissions allow no other.
#
# Authentication: with --nkey, the worker proves it holds the seed of that public user nkey
# (HIVE_NATS_NKEY_SEED_FILE on its side) and no password exists; without it, the password is the
# variable WORKER_<NAME>_PASSWORD of secrets.conf: nats/make-secrets.sh NAME adds it, and writes the
# worker's copy to passwords/NAME. One name per machine (or per leaf site): workers sharing a name
# could write each other's heartbeats and read each other's inboxes. gateway, admin and site are
# the hub's own users, refused as names.
set -euo pipefail

value() { # value OPTION [VALUE...]: the option's value, or a usage message
    [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || { echo "worker-user: $1 needs a value (see --help)" >&2; exit 2; }
}

prefix=hive
nkey=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) value "$@"; prefix="$2"; shift 2 ;;
        --nkey) value "$@"; nkey="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*) echo "worker-user: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -lt 2 ]; then
    echo "worker-user: give a worker NAME and at least one PROVIDER (see --help)" >&2
    exit 2
fi
name="$1"
shift
token='^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'
[[ "$name" =~ $token ]] || { echo "worker-user: worker name '$name' must be 1-64 letters, digits, '_' or '-'" >&2; exit 2; }
# the users the shipped configs define besides the workers (accounts.conf, leafnodes.conf): a block
# for one of them would be a duplicate user, and its password variable not that user's
case "${name,,}" in
    gateway|admin|site) echo "worker-user: '$name' is one of the hub's own users (gateway, admin, site), not a worker name" >&2; exit 2 ;;
esac
[[ "$prefix" =~ ^[a-z][a-z0-9_]{0,31}$ ]] || { echo "worker-user: prefix '$prefix' must be 1-32 lower-case letters, digits or '_', starting with a letter" >&2; exit 2; }
for p in "$@"; do
    [[ "$p" =~ $token ]] || { echo "worker-user: provider '$p' must be 1-64 letters, digits, '_' or '-'" >&2; exit 2; }
done
if [ -n "$nkey" ] && [[ ! "$nkey" =~ ^U[A-Z2-7]{55}$ ]]; then
    echo "worker-user: '$nkey' is not a public user nkey (56 characters starting with U)" >&2
    exit 2
fi

P="${prefix^^}"
tasks="${P}_TASKS"
env_name="WORKER_$(echo "$name" | tr 'a-z-' 'A-Z_')_PASSWORD"

if [ -n "$nkey" ]; then
    auth="nkey: $nkey"
else
    auth="user: \"$name\", password: \$$env_name"
fi

pub=()
sub=()
for p in "$@"; do
    for prio in high normal low; do
        pub+=("\"\$JS.API.CONSUMER.INFO.$tasks.${prefix}_${p}_$prio\"" "\"\$JS.API.CONSUMER.MSG.NEXT.$tasks.${prefix}_${p}_$prio\"")
    done
    for status in running retrying moved completed failed; do
        pub+=("\"$prefix.events.$p.*.$status\"")
    done
    # a final outcome JetStream refused as a duplicate (a zombie worker's), reported for the metrics
    pub+=("\"$prefix.events.$p.*.*.duplicate\"")
    # its provider's dead letters, in a stream of their own (made by the gateway with the consumers)
    pub+=("\"$prefix.dlq.$p.*\"" "\"\$JS.API.STREAM.INFO.${P}_DLQ_$p\"")
    # the chunks of a streamed task it runs (core NATS, read by the gateway alone): no other provider's
    pub+=("\"$prefix.chunks.$p.*\"")
    # a task it fetched that was cancelled while queued, taken off its provider's count (the counters
    # stream, made by the gateway; hive_bus/_cancel.py): no other counter
    pub+=("\"$prefix.counters.unfetched_cancels.$p\"")
    # its provider's events, in a stream of their own with its own limits (made by the gateway with
    # the consumers): what its workers write there can push out that provider's history, no other's.
    # A redelivered task's last event on this provider (how many of its deliveries only waited out a
    # rate limit); the grant names the provider's stream, so no other provider's events can be read
    pub+=("\"\$JS.API.STREAM.INFO.${P}_EVENTS_$p\"" "\"\$JS.API.DIRECT.GET.${P}_EVENTS_$p.$prefix.events.$p.>\"")
    pub+=("\"\$KV.${prefix}_providers.$p.>\"" "\"\$JS.API.DIRECT.GET.KV_${prefix}_providers.\$KV.${prefix}_providers.$p.>\"")
    pub+=("\"\$KV.${prefix}_budgets.$p.>\"" "\"\$JS.API.DIRECT.GET.KV_${prefix}_budgets.\$KV.${prefix}_budgets.$p.>\"")
    # the response cache (hive_bus/_cache.py): its own provider's cached answers, read and written
    pub+=("\"\$KV.${prefix}_cache.$p.>\"" "\"\$JS.API.DIRECT.GET.KV_${prefix}_cache.\$KV.${prefix}_cache.$p.>\"")
    sub+=("\"$prefix.tasks.$p.high.*\"" "\"\$KV.${prefix}_providers.$p.>\"")
    # its own heartbeat keys, one provider's each: a heartbeat counts only for the provider its key
    # names (hive_bus/_messages.py, beat_of), so no credential can say it serves another provider
    pub+=("\"\$KV.${prefix}_workers.$name.$p.*\"")
    # cancelled tasks (hive_bus/_cancel.py): its own provider's keys, heard as they are put and read
    # one task's at a time, with no consumer (a credential that may make consumers may use up the
    # account's)
    sub+=("\"\$KV.${prefix}_cancels.$p.*\"")
    pub+=("\"\$JS.API.DIRECT.GET.KV_${prefix}_cancels.\$KV.${prefix}_cancels.$p.*\"")
    # claim check (hive_bus/_blobs.py), the minimum: write the chunks of its own provider's outputs
    # (and of a dead letter's task) to its provider's bucket, of its own limit (made by the gateway with
    # the consumers): filling it fills no other provider's; and read its own provider's task contents a
    # chunk at a time by direct gets, there or in the bucket of every provider that older hubs wrote;
    # no consumer, no object entries ($O.<bucket>.M.>), no other provider's chunks
    pub+=("\"\$JS.API.STREAM.INFO.OBJ_${prefix}_blobs_$p\"" "\"\$O.${prefix}_blobs_$p.C.$p.>\"")
    pub+=("\"\$JS.API.DIRECT.GET.OBJ_${prefix}_blobs_$p.\$O.${prefix}_blobs_$p.C.$p.>\"")
    pub+=("\"\$JS.API.DIRECT.GET.OBJ_${prefix}_blobs.\$O.${prefix}_blobs.C.$p.>\"")
done

join() { local IFS=','; echo "$*" | sed 's/,/,\n          /g'; }

cat <<BLOCK
    # worker "$name": providers $*
    {
      $auth
      permissions: {
        publish: { allow: [
          # start-up checks of the bus objects
          "\$JS.API.STREAM.INFO.$tasks",
          "\$JS.API.STREAM.INFO.KV_${prefix}_workers", "\$JS.API.STREAM.INFO.KV_${prefix}_providers",
          "\$JS.API.STREAM.INFO.KV_${prefix}_budgets",
          "\$JS.API.STREAM.INFO.KV_${prefix}_cancels",
          "\$JS.API.STREAM.INFO.KV_${prefix}_cache",
          # per provider: bind to and pull from its consumers (created by the gateway), its tasks'
          # events and dead letters, compare-and-set of its cooldowns and budgets, its heartbeat keys
          $(join "${pub[@]}")
        ] }
        subscribe: { allow: [
          "_INBOX.$name.>",
          $(join "${sub[@]}")
        ] }
        # acks, NAKs, TERMs and in-progress acks go to each delivered task's reply subject: a call of
        # up to 10 minutes sends an in-progress ack every AckWait/3 (10 s by default), up to 60, then
        # one final ack; after 100 responses or 15 minutes the reply subject is closed to this worker
        allow_responses: { max: 100, expires: "15m" }
      }
    }
BLOCK
