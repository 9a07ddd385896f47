#!/usr/bin/env bash
# The Compose specification's JSON schema, for tests/test_deploy_files.py: the copy that the
# docker-compose package on PyPI ships (compose/config/compose_spec.json), fetched with pip once per
# virtualenv into VENV/share/compose-spec/. Without it, the schema test skips and says why.
#   tests/setup/fetch-compose-schema.sh [VENV]       (make test runs it)
set -u
venv="${1:-.venv}"
out="$venv/share/compose-spec/compose_spec.json"
[ -s "$out" ] && exit 0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! timeout 180 "$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$tmp" "docker-compose==1.29.2" >/dev/null 2>&1; then
    echo "fetch-compose-schema: could not download docker-compose from PyPI: the compose schema test will be skipped" >&2
    exit 0
fi
mkdir -p "$(dirname "$out")"
"$venv/bin/python" - "$tmp" "$out" <<'PY'
import pathlib
import sys
import zipfile

wheel = next(pathlib.Path(sys.argv[1]).glob("docker_compose-*.whl"))
with zipfile.ZipFile(wheel) as whl:
    pathlib.Path(sys.argv[2]).write_bytes(whl.read("compose/config/compose_spec.json"))
PY
echo "fetch-compose-schema: $out" >&2
