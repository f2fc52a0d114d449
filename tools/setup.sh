#!/usr/bin/env bash
# Installs everything compactdeploy needs on a fresh Debian/Ubuntu machine, idempotently:
# a virtual environment in .venv with the pinned Python packages, and the aarch64 cross linker.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: compactdeploy needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
# reinstall only when the pinned dependencies change
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing the pinned Python packages into .venv (torch CPU, TVM, ONNX; a few minutes the first time)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# The Raspberry Pi and Jetson targets link aarch64 libraries. Debian's cross gcc (25 s to install)
# where apt-get is usable; otherwise zig from PyPI (large, slow first link) does the same job.
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && ! .venv/bin/python -c 'import ziglang' 2>/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
        echo "setup: installing the aarch64 cross linker (apt-get install gcc-aarch64-linux-gnu)"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null
    else
        echo "setup: no apt-get as root; installing zig from PyPI as the aarch64 linker"
        .venv/bin/python -m pip install --quiet ziglang
    fi
fi
echo "setup: ready (.venv/bin/compactdeploy)"
