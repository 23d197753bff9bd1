"""Flax Linen models and the model registry."""

from __future__ import annotations

import flax.linen as nn

from jtricks.errors import unknown_name
from jtricks.nn.models import ACTIVATIONS, CNN1D, MLP, MODELS, get_activation
from jtricks.spec import call_with_checked_args, parse_spec


def build_model(spec: str, num_classes: int) -> nn.Module:
    """Build a registered model from a spec such as ``"cnn"`` or ``"mlp(features=(256, 256), dropout=0.2)"``.

    Raises:
      ConfigError: for an unknown name (listing the valid ones) or a bad argument.
    """
    name, args, kwargs = parse_spec(spec, what="model")
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    kwargs.setdefault("num_classes", num_classes)
    return call_with_checked_args(MODELS[name], args, kwargs, what=f"model {name!r}")


__all__ = ["ACTIVATIONS", "CNN1D", "MLP", "MODELS", "build_model", "get_activation"]
