"""What `fit`'s non-finite guard and its logged gradient norm cost a training step.

One epoch of ``--steps`` steps in one compiled ``lax.scan`` (the state donated), on the
same device-resident batches, for five steps (each epoch returns its steps' metrics, as
`fit`'s epoch keeps them for its means, so that none is computed only to be dropped):

* ``hand``: the hand-written Flax + optax step (``baselines/flax_step.py``);
* ``plain``: `jtricks.training.make_train_step` with neither (``skip_nonfinite=False,
  norms=False``): jtricks' step itself (task metrics, dropout key, EMA hooks);
* ``norms``: with the per-step gradient norm (``train_grad_norm``);
* ``guard``: with the guard: a step whose loss or gradient is NaN/inf, or whose new
  parameters' norm overflows, keeps the old parameters, optimizer state and statistics
  (one select per leaf, after the norms of the gradient and of the new parameters);
* ``default``: both, the step `fit` compiles by default.

Compilation excluded (one warm-up call each); arms in turn, ``--repeats`` rounds;
medians and each arm's ratio to ``hand`` (its steps/s over the hand step's). Also the
kernels in each compiled loop body (XLA's fusions, library calls and copies after
optimisation: on a CPU or a GPU each is launched every step, so on a small model their
count rather than their FLOPs sets the step's cost), and how far each arm's parameters
end from the hand step's after the epoch (the same work, up to float reassociation).

    python benchmarks/bench_guard.py                      # the MNIST-1D MLP's shapes
    python benchmarks/bench_guard.py --model cnn --repeats 41

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import time_arms, write_result

from baselines import flax_step
from jtricks.data import epoch_indices
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, make_train_step

ARMS = {
    "plain": dict(skip_nonfinite=False, norms=False),
    "norms": dict(skip_nonfinite=False, norms=True),
    "guard": dict(skip_nonfinite=True, norms=False),
    "default": dict(skip_nonfinite=True, norms=True),
}
LAUNCHES = ("fusion", "custom-call", "dot", "convolution", "copy", "reduce", "scatter", "gather")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--shape", default="40", help="example shape, e.g. 40 or 32,32,3")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=36, help="steps in the timed epoch")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def body_kernels(compiled_text: str) -> int:
    """Kernels launched per step: the instructions of the kinds in `LAUNCHES` in the body
    of the epoch's loop (the ``while`` of the entry computation; a loop XLA makes inside
    it, such as an expanded scatter, counts as none)."""
    entry = compiled_text[compiled_text.index("\nENTRY ") :]
    body = re.search(r"while\(.*?body=(%[\w.\-]+)", entry)[1]
    start = compiled_text.index("\n" + body + " ")
    text = compiled_text[start : compiled_text.index("\n}\n", start)]
    kinds = re.findall(r"^\s*(?:ROOT )?\S+ = \S+ ([\w\-]+)\(", text, re.M)
    return sum(kind in LAUNCHES for kind in kinds)


def make_arms(args: argparse.Namespace):
    """Every arm as ``(epoch, start)``: a donating jitted epoch ``(carry, idx) -> (carry,
    per-step metrics)`` and a function giving a fresh copy of its starting carry (the
    same parameters in every arm)."""
    shape = tuple(int(s) for s in args.shape.split(","))
    n = args.batch_size * args.steps
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, args.num_classes, n).astype(np.int32))
    model, tx = build_model(args.model, args.num_classes), optax.adam(1e-3)
    state = create_train_state(model, tx, x, jax.random.key(0))
    hand_carry = (state.params, state.batch_stats or {}, state.opt_state)
    arms = {"hand": (flax_step.make_step(model, tx, x, y), hand_carry)}
    for name, options in ARMS.items():
        step = make_train_step(task="classification", **options)
        arms[name] = (lambda s, i, step=step: step(s, (x[i], y[i])), state)
    idx = epoch_indices(jax.random.key(1), n, args.batch_size, args.steps)
    out = {}
    for name, (step, carry) in arms.items():
        epoch = jax.jit(lambda c, i, step=step: jax.lax.scan(step, c, i), donate_argnums=0)
        out[name] = (epoch, lambda carry=carry: jax.tree.map(jnp.copy, carry))
    return out, idx


def params_of(carry) -> list[np.ndarray]:
    """The parameters of a hand carry ``(params, stats, opt_state)`` or a `TrainState`."""
    params = carry[0] if isinstance(carry, tuple) else carry.params
    return [np.asarray(a) for a in jax.tree.leaves(params)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    arms, idx = make_arms(args)

    def timed(epoch, start):
        def run() -> float:
            carry = jax.block_until_ready(start())
            t = time.perf_counter()
            jax.block_until_ready(epoch(carry, idx))
            return time.perf_counter() - t

        return run

    times = time_arms({k: timed(*v) for k, v in arms.items()}, args.repeats)
    ends = {k: params_of(epoch(start(), idx)[0]) for k, (epoch, start) in arms.items()}
    hand = statistics.median(times["hand"])
    result = {
        "benchmark": "bench_guard",
        **{k: getattr(args, k) for k in ("model", "shape", "batch_size", "steps", "repeats")},
        "arms": {
            name: {
                "median_ms": 1e3 * statistics.median(t),
                "times_s": t,
                "ratio_to_hand": hand / statistics.median(t),
                "kernels_per_step": body_kernels(
                    arms[name][0].lower(arms[name][1](), idx).compile().as_text()
                ),
                "max_param_diff_vs_hand": max(
                    float(np.max(np.abs(a - b)))
                    for a, b in zip(ends[name], ends["hand"], strict=True)
                ),
            }
            for name, t in times.items()
        },
        "environment": environment(),
    }
    report(result, args.json_out)
    return result


def report(result: dict, json_out: str | None) -> None:
    print(json.dumps(result))
    write_result(result, json_out)
    print(f"{'arm':10s} {'ms/epoch':>9s} {'hand/arm':>9s} {'kernels/step':>13s}")
    for name, arm in result["arms"].items():
        print(
            f"{name:10s} {arm['median_ms']:9.3f} {arm['ratio_to_hand']:9.3f} "
            f"{arm['kernels_per_step']:13d}"
        )
    print(f"{result['steps']} steps per epoch   device: {jax.default_backend()}")


if __name__ == "__main__":
    main()
