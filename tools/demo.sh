#!/usr/bin/env bash
# The main job, end to end: train LeNet-5 on scikit-learn's digits, then prune it to half its
# channels, fine-tune it for 5 epochs and build it for a Raspberry Pi 4 (cross-compiled) and for this machine (measured here).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin/compactdeploy
mkdir -p build
[ -f build/lenet5-digits.pt ] || $bin train --model lenet5 --data digits --epochs 15 --out build/lenet5-digits.pt
$bin build --model lenet5 --weights build/lenet5-digits.pt --data digits --target rpi4 --prune l1:0.5 --finetune-epochs 5 --out build/lenet5-rpi4
$bin build --model lenet5 --weights build/lenet5-digits.pt --data digits --target host --prune l1:0.5 --finetune-epochs 5 --out build/lenet5-host
