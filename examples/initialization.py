"""Signal propagation at initialisation through a 50-layer MLP (T03, T04).

    python examples/initialization.py        # a few seconds

Feeds 1000 standard-normal inputs through 50 Dense layers of width 256 (no biases)
and prints each initialiser's activation std after layers 1, 10, 25 and 50.

Expected pattern:
* ReLU: N(0, 1) explodes (std ~1e10 by layer 10, then inf/NaN); LeCun and Glorot
  (variance 1/n) halve the signal every layer it passes; He (variance 2/n) keeps
  the std within [0.5, 2] at every depth.
* tanh: N(0, 1) saturates (almost every unit at ±1, so gradients vanish); PyTorch's
  ``uniform`` dies out; LeCun and Glorot shrink only slowly, like 1/sqrt(2 l) at
  layer l (0.1 at layer 50), because tanh is contractive; with tanh's usual gain
  5/3 (``torch.nn.init.calculate_gain('tanh')``) they keep the std within [0.5, 2].
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jtricks.nn.initializers import INITIALIZERS, get_initializer

ACTS = {"tanh": jnp.tanh, "relu": jax.nn.relu}
TANH_GAIN = 5.0 / 3.0


def layer_stats(
    initializer: str,
    activation: str,
    *,
    depth: int = 50,
    width: int = 256,
    gain: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-layer activation std and mean |activation| at initialisation."""
    init, act = get_initializer(initializer), ACTS[activation]
    x = jax.random.normal(jax.random.key(seed), (1000, width))
    keys = jax.random.split(jax.random.key(seed + 1), depth)
    stds, absmean = [], []
    for k in keys:
        x = act(x @ (gain * init(k, (width, width), jnp.float32)))
        stds.append(float(jnp.std(x)))
        absmean.append(float(jnp.mean(jnp.abs(x))))
    return {"std": np.array(stds), "abs_mean": np.array(absmean)}


def verdict(stats: dict[str, np.ndarray], activation: str) -> str:
    std = stats["std"]
    if not np.all(np.isfinite(std)) or std.max() > 1e3:
        return "explodes"
    if activation == "tanh" and stats["abs_mean"][-1] > 0.9:
        return "saturates"
    if np.all((std >= 0.5) & (std <= 2.0)):
        return "kept in [0.5, 2]"
    if std[-1] < 1e-3:
        return "vanishes"
    return f"shrinks to {std[-1]:.2g}"


def rows(depth: int = 50) -> list[tuple[str, str, float, dict]]:
    out = []
    for activation in ACTS:
        for name in INITIALIZERS:
            out.append((activation, name, 1.0, layer_stats(name, activation, depth=depth)))
        if activation == "tanh":
            for name in ("lecun_normal", "glorot_uniform"):
                out.append(
                    (
                        activation,
                        name,
                        TANH_GAIN,
                        layer_stats(name, activation, depth=depth, gain=TANH_GAIN),
                    )
                )
    return out


def main(argv: list[str] | None = None) -> list[tuple[str, str, float, dict]]:
    p = argparse.ArgumentParser(description="activation std through a deep MLP at initialisation")
    p.add_argument("--depth", type=int, default=50)
    args = p.parse_args(argv)
    table = rows(args.depth)
    marks = [i for i in (1, 10, 25, 50) if i <= args.depth]
    print(f"{args.depth}-layer MLP, width 256, activation std after layer:\n")
    print(
        f"{'act':<6}{'initializer':<24}"
        + "".join(f"{'L' + str(m):>10}" for m in marks)
        + "  verdict"
    )
    for activation, name, gain, stats in table:
        label = name if gain == 1.0 else f"{name} x 5/3"
        cells = "".join(f"{stats['std'][m - 1]:>10.3g}" for m in marks)
        print(f"{activation:<6}{label:<24}{cells}  {verdict(stats, activation)}")
    return table


if __name__ == "__main__":
    main()
