#!/usr/bin/env bash
# Creates ./.venv with everything raytrain needs, once. Sourced by scripts/run and scripts/test;
# the second time it costs one file comparison.
#
# torch is installed first and pinned to a CPU build: a bare `torch` requirement on a machine
# without torch pulls a multi-GB CUDA build. Outside this machine, point pip at PyTorch's CPU
# wheel index with RAYTRAIN_TORCH_INDEX (see README).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RAYTRAIN_VENV:-$root/.venv}"
torch_spec="${RAYTRAIN_TORCH:-torch==2.13.0}"
stamp="$venv/.raytrain-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16) $torch_spec"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0 2>/dev/null || exit 0
fi

log="$venv/setup.log"
echo "raytrain: setting up $venv (first run only; under a minute)" >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
: > "$log"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; }
fail() { echo "raytrain: set-up failed: $1; the last lines of $log:" >&2; tail -n 15 "$log" >&2; exit 1; }

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${RAYTRAIN_TORCH_INDEX:-}" ]; then
        pip install "$torch_spec" --index-url "$RAYTRAIN_TORCH_INDEX" || fail "could not install $torch_spec"
    else
        pip install "$torch_spec" || fail "could not install $torch_spec"
    fi
fi
# The rest through uv where it can be had: it installs in about 10 s what pip takes 2.5 minutes
# for here. uv reads no pip.conf, so behind a private index it may fail: then pip does it. torch
# is in place already and satisfies the project's range, so neither touches it.
# --compile-bytecode does what pip does by default: writes each module's .pyc at install. Without
# it a Python that may not write bytecode (PYTHONDONTWRITEBYTECODE=1, as on this machine)
# compiles Ray, pandas and the rest from source in every process it starts: importing
# ray.train.torch took 5.3 s of CPU instead of 2.5 s, and each Ray Train run starts four or more
# such processes (measured in docs/testing.md).
uv() {
    "$venv/bin/python" -m uv pip install --compile-bytecode --python "$venv/bin/python" "$@" \
        >>"$log" 2>&1
}
if ! { pip install "uv>=0.4" && uv -e "$root[test]"; }; then
    pip install -e "$root[test]" || fail "could not install raytrain and its dependencies"
fi
echo "$want" > "$stamp"
echo "raytrain: set-up done" >&2
