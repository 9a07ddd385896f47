#!/bin/sh
# Tools the test suite uses beyond Python, installed when missing: strace (tests/faults, to see nats-server
# fsync before it acks a publish). apt-get runs only when a tool is missing and only as root; otherwise this
# says what is missing and the tests that need it skip, saying why. It never fails the build.
set -u
missing=""
for tool in strace; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0
uid=$(id -u 2>/dev/null || echo 1)
if [ "$uid" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup/tools.sh: missing:$missing; not root or no apt-get, so the tests that need it will skip" >&2
    exit 0
fi
echo "tests/setup/tools.sh: installing$missing with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! timeout 300 apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
    timeout 300 apt-get update -q >/dev/null 2>&1
    timeout 300 apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 ||
        echo "tests/setup/tools.sh: could not install$missing; the tests that need it will skip" >&2
fi
exit 0
