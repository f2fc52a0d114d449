#!/usr/bin/env bash
# Builds (or finds, cached) the arm64 sysroot of the emulated Raspberry Pi and prints its path:
# Debian bookworm's python3.11 via mmdebstrap plus aarch64 wheels of the TVM runtime and numpy.
# Needs qemu-user and mmdebstrap (apt-get install qemu-user mmdebstrap, or tools/setup.sh --for-tests).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m compactdeploy.device.emulate
