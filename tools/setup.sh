#!/usr/bin/env bash
# Installs everything compactdeploy needs on a fresh Debian/Ubuntu machine, idempotently:
# a virtual environment in .venv with the pinned Python packages, and the aarch64 cross linker.
# --for-tests also installs what the tests use: qemu-user and mmdebstrap (the emulated Raspberry
# Pi) and OpenSSH's server and client (shipping over SSH to 127.0.0.1).
set -euo pipefail
for_tests=0
[ "${1:-}" = "--for-tests" ] && for_tests=1
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
    .venv/bin/python -m pip install --quiet -e ".[host,test,bench]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
can_apt() { command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; }
apt_updated=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    $SUDO apt-get install -y -qq "$@" >/dev/null
}

# The Raspberry Pi and Jetson targets link aarch64 libraries. Debian's cross gcc (25 s to install)
# where apt-get is usable; otherwise zig from PyPI (large, slow first link) does the same job.
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && ! .venv/bin/python -c 'import ziglang' 2>/dev/null; then
    if can_apt; then
        echo "setup: installing the aarch64 cross linker (apt-get install gcc-aarch64-linux-gnu)"
        apt_install gcc-aarch64-linux-gnu
    else
        echo "setup: no apt-get as root; installing zig from PyPI as the aarch64 linker"
        .venv/bin/python -m pip install --quiet ziglang
    fi
fi
# For the tests: qemu-user runs an arm64 Python and mmdebstrap builds its root (the emulated
# Raspberry Pi); sshd on 127.0.0.1 receives shipped bundles.
if [ "$for_tests" -eq 1 ] && ! { command -v qemu-aarch64 && command -v mmdebstrap && [ -x /usr/sbin/sshd ]; } >/dev/null 2>&1; then
    if can_apt; then
        echo "setup: installing qemu-user, mmdebstrap and openssh-server (for the tests)"
        apt_install qemu-user mmdebstrap openssh-server openssh-client
    else
        echo "setup: warning: cannot apt-get qemu-user, mmdebstrap and openssh-server; those tests will be skipped" >&2
    fi
fi
echo "setup: ready (.venv/bin/compactdeploy)"
