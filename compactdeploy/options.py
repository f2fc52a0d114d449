"""The command line's shared options and their parsers. Each option's name is the name of the
config field it fills (``config.py``), so the CLI builds configs by name."""

from __future__ import annotations

from pathlib import Path

import click


def _parse_shape(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape like 1,28,28") from None
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{value!r} is not a shape like 1,28,28")
    return shape


def _parse_widths(_ctx, _param, value: str | None) -> dict[str, int]:
    from .prune import parse_widths

    return parse_widths(value)


def parse_model_args(_ctx, _param, value: tuple[str, ...]) -> dict:
    from .zoo import parse_model_args

    return parse_model_args(value)


class _MethodsOption(click.Option):
    """--prune, its help listing the methods table (read only when help is shown: it imports torch)."""

    def get_help_record(self, ctx):
        from .prune import METHODS

        self.help = (f"{', '.join(METHODS)}; RATIO of each layer's channels goes (data-free:auto picks widths itself). "
                     "docs/methods.md describes each.")
        return super().get_help_record(ctx)


def _options(*decorators):
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


# what build and prune share: the model and how to prune it
model_and_pruning = _options(
    click.option("--model", required=True, help="Zoo name (see 'compactdeploy models') or path/to/file.py:factory."),
    click.option("--prune", cls=_MethodsOption, metavar="METHOD[:RATIO]", help="A pruning method."),
    click.option("--widths", callback=_parse_widths, help="Per-layer widths, e.g. 7=60,9=40 (overrides RATIO for those layers)."),
    click.option("--plan", type=click.Path(path_type=Path), metavar="PLAN.json",
                 help="Replay a width plan (the plan.json of a bundle or a budgeted search): its method, widths and "
                      "channels, checked to be the same ones."),
    click.option("--allow-grow", is_flag=True,
                 help="Let --widths above a layer's width (or a budget search with room to spare) widen it: copies of its "
                      "strongest channels, function-preserving (Net2WiderNet); train it after with --finetune-epochs."),
    click.option("--weights", type=click.Path(path_type=Path), help="A state_dict or a 'compactdeploy train/prune' checkpoint."),
    click.option("--data", help="digits, wine, breast-cancer, mnist1d or a .npz (x, y): reports accuracy."),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", callback=parse_model_args,
                 help="Model option, repeatable."),
    click.option("--input-shape", callback=_parse_shape, help="One sample's shape, e.g. 3,32,32 (batch is 1)."),
    click.option("--exclude", multiple=True, metavar="LAYER", help="Layer name not to prune, repeatable."),
    click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(min=0), help="Train this many epochs after pruning (needs --data)."),
    click.option("--distill", is_flag=True, help="Fine-tune with distillation from the unpruned model."),
    click.option("--noise-outputs", default=0, show_default=True, type=click.IntRange(min=0), help="NoiseOut: K noise outputs trained before pruning."),
    click.option("--noise-epochs", default=3, show_default=True, type=click.IntRange(min=1), help="Epochs of that training."),
    click.option("--calibration-samples", default=256, show_default=True, type=click.IntRange(min=1), help="Training samples the data-driven methods see."),
    click.option("--seed", default=0, show_default=True, help="Seed of training and of the random example input."),
)
DEVICE_WAIT = click.option("--device-wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
                            help="Seconds to wait for a busy tracker key.")
