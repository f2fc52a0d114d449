"""A small MLP for tables (wine, breast-cancer, a user's .npz of feature vectors)."""

from torch import nn

from compactdeploy.zoo import register_model


@register_model(
    "mlp-tabular",
    input_shape=lambda in_features, **_: (in_features,),
    description="MLP for feature vectors (in-64-32-classes), BatchNorm + ReLU",
    default_data="breast-cancer",
    input_arg="in_features",
)
def mlp_tabular(in_features: int = 30, num_classes: int = 2, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden // 2),
        nn.BatchNorm1d(hidden // 2),
        nn.ReLU(),
        nn.Linear(hidden // 2, num_classes),
    )
