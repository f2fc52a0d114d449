"""LeNet-300-100 (an MLP) and LeNet-5 (a small CNN), as in the pruning literature."""

from torch import nn

from compactdeploy.zoo import register_model


@register_model(
    "lenet300",
    input_shape=lambda in_features, **_: (in_features,),
    description="LeNet-300-100 MLP (784-300-100-10 on 28x28 images)",
    default_data="digits",
    input_arg="in_features",
)
def lenet300(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model(
    "lenet5",
    input_shape=lambda in_channels, input_size, **_: (in_channels, input_size, input_size),
    description="LeNet-5 CNN (conv 6-16, fc 120-84) on 28x28 images",
    default_data="digits",
)
def lenet5(in_channels: int = 1, input_size: int = 28, num_classes: int = 10) -> nn.Module:
    # conv1 pads by 2 so a 28x28 input gives LeNet-5's 5x5x16 feature map before the classifier
    after_convs = ((input_size + 4 - 4) // 2 - 4) // 2
    if after_convs < 1:
        raise ValueError(f"input_size {input_size} is too small for LeNet-5 (at least 12)")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * after_convs * after_convs, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
