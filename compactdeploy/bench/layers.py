"""One name for a convolution in TVM's kernels and in onnxruntime's profile, so a per-layer
comparison pairs them (tools/bench_tuning.py's table)."""

from __future__ import annotations

import math

from ..compile.passes import CONV_LAYOUT


def conv_layer(data: list[int], weight: list[int], out: list[int]) -> tuple[tuple, str, float]:
    """A convolution's key (channels first), name and multiply-add FLOPs, from NCHW shapes."""
    _, cin, h, w = data
    cout, cin_per_group, kh, kw = weight
    flops = 2.0 * math.prod(out) * cin_per_group * kh * kw
    depthwise = cin_per_group == 1 and cin > 1
    label = f"conv {cin}->{cout} {kh}x{kw}{' depthwise' if depthwise else ''} at {h}x{w} -> {out[2]}x{out[3]}"
    return (cin, cout, h, w, kh, kw, out[2], out[3], depthwise), label, flops


def nchw_from_nhwc(data: list[int], weight: list[int], out: list[int]) -> tuple[list[int], list[int], list[int]]:
    """TVM's CPU kernels take NHWC data and OHWI weights (compactdeploy.compile.CONV_LAYOUT); onnxruntime
    reports NCHW and OIHW: one spelling for both."""
    assert CONV_LAYOUT["relax.nn.conv2d"] == ["NHWC", "OHWI"], CONV_LAYOUT
    nchw = lambda s: [s[0], s[3], s[1], s[2]]  # noqa: E731
    return nchw(data), nchw(weight), nchw(out)


def same_layer_in_tvm(key: tuple, layers: dict[tuple, dict]) -> tuple | None:
    """The TVM layer an onnxruntime convolution is: onnxruntime's NCHWc layout pads channels to its
    vector width (8 or 16) and its profiler reports the padded shapes (LeNet-5's 6 filters run as
    16, MobileNetV2's 24 input channels as 32), so its input and output channels may each exceed TVM's
    by the padding. Output channels stay in the match: MobileNetV2's 960->160 and 960->320 at 7x7 are
    two layers.
    """
    def padded(ours: int, theirs: int) -> bool:
        return ours <= theirs <= -(-ours // 16) * 16

    padded_from = [k for k in layers if k[2:] == key[2:] and padded(k[0], key[0]) and padded(k[1], key[1])]
    return max(padded_from, default=None)
