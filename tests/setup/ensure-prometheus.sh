#!/usr/bin/env bash
# Make sure `prometheus` and `promtool` are on PATH for the deployment tests (Debian's package).
#
# Installs them only when missing, and only as root or with passwordless sudo; otherwise says why and
# leaves the tests to skip with that reason. The Debian package starts its own service on :9090: it is
# stopped here, because the tests run their own prometheus on a free loopback port.
set -u

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "ensure-prometheus: prometheus/promtool missing and not root (nor passwordless sudo):" \
        "the Prometheus tests will be skipped. Install Debian's 'prometheus' package to run them." >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: prometheus/promtool missing and no apt-get here:" \
        "the Prometheus tests will be skipped. Install prometheus and promtool to run them." >&2
    exit 0
fi

echo "ensure-prometheus: installing Debian's prometheus package (prometheus, promtool)" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d (exit 101) keeps apt from starting the service inside this install, where it is honoured
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null && "${as_root[@]}" chmod +x "$policy" && made_policy=1
fi
ok=0
if timeout 300 "${as_root[@]}" apt-get update -qq &&
    timeout 400 "${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    ok=1
fi
[ "$made_policy" -eq 1 ] && "${as_root[@]}" rm -f "$policy"

# Whatever started it (systemd, an init script that ignored policy-rc.d), the packaged service must
# not keep running: end it by the pid of the packaged binary only.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${as_root[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
for pid in $(pgrep -x prometheus 2>/dev/null); do
    if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/bin/prometheus ] &&
        [ "$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')" = prometheus ]; then
        "${as_root[@]}" kill "$pid" 2>/dev/null || true
    fi
done

if [ "$ok" -ne 1 ] || ! command -v promtool >/dev/null 2>&1; then
    echo "ensure-prometheus: could not install the prometheus package: the Prometheus tests will be skipped." >&2
fi
exit 0
