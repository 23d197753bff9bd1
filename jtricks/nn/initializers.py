"""Weight initialisers by name, each a Flax initializer ``(key, shape, dtype) -> array``.

Fan-in ``n_in`` and fan-out ``n_out`` follow Flax: for a Dense kernel ``(n_in, n_out)``;
for a conv kernel ``(*window, c_in, c_out)`` they are multiplied by the window size.
Conventions, stated as **variance** (std = sqrt of it):

=================  ==========================================  ===============================
name               distribution                                variance
=================  ==========================================  ===============================
``uniform``        U(-1/sqrt(n_in), +1/sqrt(n_in))             1 / (3 n_in)  (PyTorch default)
``gaussian``       N(0, 1/n_in), plain normal                  1 / n_in
``lecun_normal``   truncated normal, rescaled                  1 / n_in      (Flax default)
``lecun_uniform``  U(±sqrt(3/n_in))                            1 / n_in
``glorot_normal``  truncated normal, rescaled                  2 / (n_in + n_out)
``glorot_uniform`` U(±sqrt(6/(n_in + n_out)))                  2 / (n_in + n_out)
``he_normal``      truncated normal, rescaled                  2 / n_in      (for ReLU)
``he_uniform``     U(±sqrt(6/n_in))                            2 / n_in
``standard_normal``N(0, 1)                                     1  (the cautionary example:
                                                                  activations grow ~sqrt(n)/layer)
=================  ==========================================  ===============================

Some texts write these as a standard deviation (e.g. "N(0, 1/n)" meaning std 1/n);
here the second argument of N is always the variance. The "truncated" forms
draw from a normal truncated at 2 std and rescale so the variance is exact.

References:
  LeCun et al., "Efficient BackProp" (1998); Glorot & Bengio (2010),
  https://proceedings.mlr.press/v9/glorot10a; He et al. (2015), https://arxiv.org/abs/1502.01852
"""

from __future__ import annotations

from flax.linen import initializers as init

from jtricks.errors import unknown_name

INITIALIZERS = {
    "uniform": init.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    "gaussian": init.variance_scaling(1.0, "fan_in", "normal"),
    "lecun_normal": init.lecun_normal(),
    "lecun_uniform": init.lecun_uniform(),
    "glorot_normal": init.glorot_normal(),
    "glorot_uniform": init.glorot_uniform(),
    "he_normal": init.he_normal(),
    "he_uniform": init.he_uniform(),
    "standard_normal": init.normal(stddev=1.0),
}

#: expected variance of each initialiser as a function of (n_in, n_out)
VARIANCE = {
    "uniform": lambda n_in, n_out: 1 / (3 * n_in),
    "gaussian": lambda n_in, n_out: 1 / n_in,
    "lecun_normal": lambda n_in, n_out: 1 / n_in,
    "lecun_uniform": lambda n_in, n_out: 1 / n_in,
    "glorot_normal": lambda n_in, n_out: 2 / (n_in + n_out),
    "glorot_uniform": lambda n_in, n_out: 2 / (n_in + n_out),
    "he_normal": lambda n_in, n_out: 2 / n_in,
    "he_uniform": lambda n_in, n_out: 2 / n_in,
    "standard_normal": lambda n_in, n_out: 1.0,
}


def get_initializer(name: str) -> init.Initializer:
    """Look up an initialiser by name; the error lists the valid names."""
    if name not in INITIALIZERS:
        raise unknown_name("initializer", name, INITIALIZERS)
    return INITIALIZERS[name]
