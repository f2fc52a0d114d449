"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with depthwise convolutions.

``width_mult`` scales every layer as in the paper (rounded to multiples of 8); ``input_size`` is the
square input side (224 for ImageNet, 32 for small images).
"""

from torch import nn

from compactdeploy.zoo import register_model

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu(cin, hidden, 1, 1)]
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, in_channels: int):
        super().__init__()
        cin = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        layers = [_conv_bn_relu(in_channels, cin, 3, 2)]
        for t, c, n, s in _SETTINGS:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


def _init_weights(model: nn.Module) -> None:
    # He initialisation as in the paper's reference code; PyTorch's default init lets the
    # activations of this deep, narrow network shrink to zero, so every input gives one output.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_model(
    "mobilenetv2",
    input_shape=lambda in_channels, input_size, **_: (in_channels, input_size, input_size),
    description="MobileNetV2 (depthwise + inverted residuals); width_mult, input_size options",
    default_data="digits",
)
def mobilenetv2(
    num_classes: int = 1000, width_mult: float = 1.0, input_size: int = 224, in_channels: int = 3
) -> nn.Module:
    if width_mult <= 0:
        raise ValueError("width_mult must be positive")
    if input_size < 32:
        raise ValueError(f"input_size {input_size} is too small (MobileNetV2 downsamples 32x)")
    return MobileNetV2(num_classes, width_mult, in_channels)
