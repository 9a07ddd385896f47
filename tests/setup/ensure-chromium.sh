#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's browser test (tests/test_dashboard.py) when it is
# missing and this user may install packages; otherwise says why not. It never fails the build: the
# test skips, naming the reason, where chromium is absent.
set -u
CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and there is no apt-get here; the dashboard browser test will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure-chromium: $CHROMIUM is missing and installing it needs root or passwordless sudo; the dashboard browser test will be skipped" >&2
    exit 0
fi

echo "ensure-chromium: installing Debian's chromium for the dashboard browser test" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt run on the machine holds the lock for a while: wait for it rather than fail.
APT_OPTS=(-q -o DPkg::Lock::Timeout=300)
if ! timeout 600 "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update >/dev/null; then
    echo "ensure-chromium: apt-get update failed; the dashboard browser test will be skipped" >&2
    exit 0
fi
if ! timeout 900 "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y --no-install-recommends chromium >/dev/null; then
    echo "ensure-chromium: apt-get install chromium failed; the dashboard browser test will be skipped" >&2
    exit 0
fi
echo "ensure-chromium: installed $("$CHROMIUM" --version 2>/dev/null)" >&2
