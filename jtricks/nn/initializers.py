"""Weight initialisers by name (T03), each a Flax initializer ``(key, shape, dtype) -> array``.

Conventions (``n_in`` = fan-in, ``n_out`` = fan-out; variance unless stated):

* ``uniform``: U(-1/sqrt(n_in), +1/sqrt(n_in)), variance 1/(3 n_in). PyTorch's
  default for ``nn.Linear`` / ``nn.Conv*`` weights (kaiming_uniform with a=sqrt(5)),
  and so the MNIST-1D paper's.
* ``lecun_normal``: truncated N(0, 1/n_in) (Flax's default).
* ``glorot_uniform``: U(±sqrt(6/(n_in+n_out))), variance 2/(n_in+n_out).
* ``he_normal``: truncated N(0, 2/n_in), for ReLU.

References:
  LeCun et al., "Efficient BackProp" (1998); Glorot & Bengio (2010),
  https://proceedings.mlr.press/v9/glorot10a; He et al. (2015), https://arxiv.org/abs/1502.01852
"""

from __future__ import annotations

from flax.linen import initializers as init

from jtricks.errors import unknown_name

INITIALIZERS = {
    "uniform": init.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    "lecun_normal": init.lecun_normal(),
    "glorot_uniform": init.glorot_uniform(),
    "he_normal": init.he_normal(),
}


def get_initializer(name: str) -> init.Initializer:
    """Look up an initialiser by name; the error lists the valid names."""
    if name not in INITIALIZERS:
        raise unknown_name("initializer", name, INITIALIZERS)
    return INITIALIZERS[name]
