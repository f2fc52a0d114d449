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
def lenet300(in_features: int = 784, num_classes: int = 10, hidden1: int = 300, hidden2: int = 100) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden1),
        nn.ReLU(),
        nn.Linear(hidden1, hidden2),
        nn.ReLU(),
        nn.Linear(hidden2, num_classes),
    )


@register_model(
    "lenet5",
    input_shape=lambda in_channels, input_size, **_: (in_channels, input_size, input_size),
    description="LeNet-5 CNN (conv 6-16, fc 120-84) on 28x28 images; widths are options",
    default_data="digits",
)
def lenet5(
    in_channels: int = 1,
    input_size: int = 28,
    num_classes: int = 10,
    conv1: int = 6,
    conv2: int = 16,
    fc1: int = 120,
    fc2: int = 84,
) -> nn.Module:
    """``fc2=0`` drops the second hidden layer: conv1=20, conv2=50, fc1=500, fc2=0 is the variant of
    the data-free pruning paper (Srinivas & Babu 2015)."""
    # conv1 pads by 2 so a 28x28 input gives LeNet-5's 5x5 feature map before the classifier
    after_convs = ((input_size + 4 - 4) // 2 - 4) // 2
    if after_convs < 1:
        raise ValueError(f"input_size {input_size} is too small for LeNet-5 (at least 12)")
    layers = [
        nn.Conv2d(in_channels, conv1, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(conv2 * after_convs * after_convs, fc1),
        nn.ReLU(),
    ]
    if fc2:
        layers += [nn.Linear(fc1, fc2), nn.ReLU()]
    layers.append(nn.Linear(fc2 or fc1, num_classes))
    return nn.Sequential(*layers)
