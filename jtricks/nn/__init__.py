"""Flax Linen models and the model registry."""

from __future__ import annotations

import flax.linen as nn
import jax

from jtricks.nn.densenet import DenseLayer, DenseNet, densenet, densenet1d
from jtricks.nn.inception import Inception, InceptionBlock, inception, inception1d
from jtricks.nn.initializers import INITIALIZERS, get_initializer
from jtricks.nn.layers import Conv1D
from jtricks.nn.models import (
    ACTIVATIONS,
    CNN1D,
    MLP,
    MODELS,
    ResidualBlock,
    ResNet,
    RNNClassifier,
    Transformer,
    WideResCNN1D,
    get_activation,
    gru,
    lstm,
    resnet18,
    resnet20,
)
from jtricks.nn.per_position import FCN1D, TransformerLM
from jtricks.nn.user import is_import_path, user_model
from jtricks.spec import build_from_registry

MODELS.update(
    {
        "inception": inception,
        "inception1d": inception1d,
        "densenet": densenet,
        "densenet1d": densenet1d,
        "fcn1d": FCN1D,
        "transformer_lm": TransformerLM,
    }
)


def build_model(spec: str, num_classes: int, *, seed: int | jax.Array = 0) -> nn.Module:
    """Build a registered model from a spec such as ``"cnn"`` or ``"mlp(features=(256, 256), dropout=0.2)"``,
    or a user's by import path, ``"mymodels:Net(width=64)"`` (a Linen or NNX module class,
    or a function returning one; see `jtricks.nn.user`, where ``seed`` seeds NNX's ``rngs``).

    Raises:
      ConfigError: for an unknown name (listing the valid ones) or a bad argument.
    """
    if is_import_path(spec):
        return user_model(spec, num_classes, seed=seed)
    return build_from_registry(spec, MODELS, what="model", defaults={"num_classes": num_classes})


__all__ = [
    "ACTIVATIONS",
    "CNN1D",
    "FCN1D",
    "INITIALIZERS",
    "MLP",
    "MODELS",
    "Conv1D",
    "DenseLayer",
    "DenseNet",
    "Inception",
    "InceptionBlock",
    "RNNClassifier",
    "ResNet",
    "ResidualBlock",
    "Transformer",
    "TransformerLM",
    "WideResCNN1D",
    "build_model",
    "densenet",
    "densenet1d",
    "get_activation",
    "get_initializer",
    "gru",
    "inception",
    "inception1d",
    "lstm",
    "resnet18",
    "resnet20",
]
