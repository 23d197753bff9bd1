"""Run the diagnostics on a healthy model and on three planted bugs (T04, T21, T27, T28).

    python examples/diagnostics.py              # ~1 min on 2 CPU cores

1. Every check on the MNIST-1D paper's CNN (what ``jtricks diagnose`` runs); plots go
   to ``--out``.
2. Gradient check on an MLP whose tanh has a wrong hand-written backward pass
   (`jax.custom_vjp` returning twice the derivative): the bad layer fails.
3. Overfit one batch with the first layer cut off from the gradient: fails.
4. Signal propagation of a 10-layer ReLU MLP initialised N(0, 1) (flagged) and with
   He initialisation (passes).
"""

from __future__ import annotations

import argparse
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jtricks import diagnostics as D
from jtricks.data import Scaler, load_dataset
from jtricks.nn import build_model
from jtricks.training import create_train_state


@jax.custom_vjp
def tanh_wrong_grad(x):
    return jnp.tanh(x)


tanh_wrong_grad.defvjp(
    lambda x: (jnp.tanh(x), x), lambda x, g: (2.0 * g * (1.0 - jnp.tanh(x) ** 2),)
)


class WrongGradMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        return nn.Dense(10, name="head")(tanh_wrong_grad(nn.Dense(32, name="hidden")(x)))


class CutOffMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        h = jax.lax.stop_gradient(nn.relu(nn.Dense(4, name="hidden")(x)))
        return nn.Dense(10, name="head")(h)


def main(argv: list[str] | None = None) -> dict[str, bool]:
    p = argparse.ArgumentParser(description="diagnostics on a healthy model and planted bugs")
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--signal-steps", default="0,100,500")
    p.add_argument("--lr-steps", type=int, default=100)
    p.add_argument("--out", default=None, help="plots folder (default: a temporary folder)")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="jtricks-diagnostics-")
    verdicts = {}

    print("== 1. the paper CNN: every check")
    result = D.diagnose(
        dataset=args.dataset,
        model="cnn",
        signal_steps=[int(s) for s in args.signal_steps.split(",")],
        lr_steps=args.lr_steps,
        out=out,
    )
    print(D.verdict_table(result))
    print(f"plots: {out}")
    verdicts["cnn: all checks"] = result["passed"]

    data = load_dataset(args.dataset)
    x = Scaler.fit("standardize", data.x_train)(data.x_train)
    y = data.y_train

    print("\n== 2. gradient check, tanh with a wrong custom_vjp")
    state = create_train_state(WrongGradMLP(), optax.sgd(0.1), x, jax.random.key(0))
    grad = D.check_gradients(state, x[:8], y[:8])
    print(grad.table())
    verdicts["wrong custom_vjp caught"] = not grad.passed

    print("\n== 3. overfit one batch, first layer cut off from the gradient")
    over = D.overfit_one_batch(CutOffMLP(), optax.adam(1e-2), x[:32], y[:32], key=jax.random.key(0))
    print(
        f"final loss {over.final_loss:.3f} after {len(over.losses)} steps: {'pass' if over.passed else 'FAIL'}"
    )
    verdicts["cut-off layer caught"] = not over.passed

    print("\n== 4. signal propagation, 10-layer ReLU MLP")
    deep = "mlp(features=(64, 64, 64, 64, 64, 64, 64, 64, 64, 64), initializer={!r})"
    for init in ("standard_normal", "he_normal"):
        state = create_train_state(
            build_model(deep.format(init), 10), optax.sgd(0.1), x, jax.random.key(0)
        )
        rep = D.signal_propagation(state, x[:256], y[:256])
        print(f"{init:<16} {'; '.join(rep.flags) or 'healthy'}")
        verdicts[f"deep mlp {init} {'flagged' if init == 'standard_normal' else 'passes'}"] = (
            not rep.passed if init == "standard_normal" else rep.passed
        )

    print("\nsummary")
    for name, ok in verdicts.items():
        print(f"  {'ok ' if ok else 'BAD'} {name}")
    return verdicts


if __name__ == "__main__":
    main()
