"""Small, faithful re-implementations of constructs users deploy (torchvision's CPU wheels are not on
the package index here): a dense block, a grouped-convolution bottleneck, a ShuffleNetV2 unit and an
MBConv block with squeeze-excitation and SiLU. Each takes a 3x8x8 input; ``--model
tests/architectures.py:NAME --input-shape 3,8,8`` builds one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all before it (``new_first``: each
    layer's new channels ahead of the old ones, so narrowing a later layer moves the stem's)."""
    def __init__(self, classes=10, new_first=False):
        super().__init__()
        self.new_first = new_first
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(14)
        self.conv2 = nn.Conv2d(14, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(20)
        self.head = nn.Linear(20, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self._cat(x, self.conv1(x))
        x = self._cat(x, self.conv2(F.relu(self.bn1(x))))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.bn2(x)), 1).flatten(1))

    def _cat(self, old, new):
        return torch.cat([new, old] if self.new_first else [old, new], 1)


class GroupedBottleneck(nn.Module):
    """ResNeXt/RegNet: a 3x3 convolution in groups of 8 channels between two 1x1s."""
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.reduce = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.expand = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.expand(F.relu(self.grouped(F.relu(self.reduce(x)))))
        return self.head(F.adaptive_avg_pool2d(F.relu(x + y), 1).flatten(1))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's basic unit: split, a branch on half, concatenate, shuffle channels."""
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pw1 = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.pw2(self.dw(F.relu(self.pw1(b)))))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def channel_shuffle(x, groups):
    """torchvision's: view as (n, groups, c/groups, h, w), swap the two, flatten back."""
    n, c, h, w = x.size()
    x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(n, -1, h, w)


def _conv_bn(cin, cout, kernel=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class ShuffleV2Unit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: stride 2 runs two branches on the input, stride 1
    splits it (chunk) and runs one; both concatenate and shuffle."""
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, half = stride, cout // 2
        self.branch1 = (nn.Sequential(_conv_bn(cin, cin, 3, stride, cin, relu=False), _conv_bn(cin, half))
                        if stride > 1 else nn.Sequential())
        self.branch2 = nn.Sequential(_conv_bn(cin if stride > 1 else half, half),
                                     _conv_bn(half, half, 3, stride, half, relu=False), _conv_bn(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """A small ShuffleNetV2: stem, one stage (a stride-2 unit and two stride-1 units), conv5, classifier."""
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = _conv_bn(3, 16, 3, 2)
        self.stage2 = nn.Sequential(ShuffleV2Unit(16, 32, 2), ShuffleV2Unit(32, 32, 1), ShuffleV2Unit(32, 32, 1))
        self.conv5 = _conv_bn(32, 64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.conv5(self.stage2(self.conv1(x))).mean((2, 3)))


class MBConvSE(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, squeeze-excitation, project; SiLU throughout."""
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.bn = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = F.silu(self.dw(F.silu(self.bn(self.expand(x)))))
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(F.adaptive_avg_pool2d(x + self.project(y * s), 1).flatten(1))


class TinyEncoder(nn.Module):
    """A 2-layer Transformer encoder on 5 tokens (``project``: an input projection, else the residual
    stream is the model's input itself) and a classifier on the mean token."""
    def __init__(self, classes=10, width=32, heads=4, project=True):
        super().__init__()
        self.project = nn.Linear(8, width) if project else None
        layer = nn.TransformerEncoderLayer(width if project else 8, heads if project else 2, 64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width if project else 8, classes)

    def forward(self, x):
        x = self.project(x) if self.project is not None else x
        return self.head(self.encoder(x).mean(1))


class PreNormBlock(nn.Module):
    """A pre-norm Transformer block as hand-written models have it (timm's ViT block): x + attn(ln(x)), x + mlp(ln(x))."""
    def __init__(self, width=16, heads=2, hidden=32):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class HandWrittenAttention(nn.Module):
    """A timm-style Transformer block: one qkv projection reshaped into (3, heads, head width) by the
    model's own code, then an MLP."""
    def __init__(self, classes=10, width=16, heads=2, hidden=32):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class InputStreamEncoder(nn.Module):
    """Two pre-norm blocks whose residual stream is the model's input (no input projection)."""
    def __init__(self, classes=10, width=16):
        super().__init__()
        self.blocks = nn.Sequential(PreNormBlock(width), PreNormBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


class InputResidualConv(nn.Module):
    """x + conv(relu(conv(x))) on the image itself: the first residual's width is the input's."""
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 3, 3, padding=1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = x + self.conv2(F.relu(self.conv1(x)))
        return self.head(F.relu(self.stem(x)).mean((2, 3)))


class MobileNetV3Block(nn.Module):
    """MobileNetV3's bottleneck: expand, depthwise, a hard-sigmoid squeeze-excitation, project; Hardswish."""
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 48, 1)
        self.bn1 = nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.bn2 = nn.BatchNorm2d(48)
        self.se_reduce = nn.Conv2d(48, 16, 1)
        self.se_expand = nn.Conv2d(16, 48, 1)
        self.project = nn.Conv2d(48, 16, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        y = F.hardswish(self.bn2(self.dw(F.hardswish(self.bn1(self.expand(x))))))
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(F.adaptive_avg_pool2d(x + self.project(y * s), 1).flatten(1))


class AudioConv1d(nn.Module):
    """A 1-D convolutional net on a 40-sample signal (MNIST-1D's length), as for audio or sensors."""
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.head(F.adaptive_avg_pool1d(F.relu(self.conv2(x)), 1).flatten(1))
