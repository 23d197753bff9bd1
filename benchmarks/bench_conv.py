"""The MNIST-1D CNN with jtricks' slice-and-matmul `Conv1D` against `flax.linen.Conv`, in one run.

Both variants have identical parameters and numbers (``CNN1D(conv_impl="slices")`` vs
``CNN1D(conv_impl="lax")``). Measured: training steps/s inside one `lax.scan` epoch
(36 steps of batch 100, Adam), and a vmapped gradient over 8 models (ensemble-style).
Compilation excluded; medians over ``--repeats``; the two alternate.

    python benchmarks/bench_conv.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.nn import CNN1D
from jtricks.run import environment
from jtricks.training import create_train_state, make_train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--epochs", type=int, default=10, help="scan epochs per timed repeat")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3600, 40)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 3600), jnp.int32)
    idx = jnp.arange(3600).reshape(36, 100)
    step = make_train_step()
    runners, vgrads = {}, {}
    for impl in ("slices", "lax"):
        model = CNN1D(conv_impl=impl)
        state = create_train_state(model, optax.adam(1e-2), x, jax.random.key(0))

        @jax.jit
        def epoch(state, idx):
            return jax.lax.scan(lambda s, i: step(s, (x[i], y[i])), state, idx)

        variables = jax.vmap(lambda k, m=model: m.init(k, x[:2]))(
            jax.random.split(jax.random.key(1), 8)
        )

        @jax.jit
        def vgrad(v, xb, m=model):
            return jax.vmap(lambda v: jax.grad(lambda v: jnp.mean(m.apply(v, xb) ** 2))(v))(v)

        jax.block_until_ready(epoch(state, idx))
        jax.block_until_ready(vgrad(variables, x[:100]))
        runners[impl] = (epoch, state)
        vgrads[impl] = (vgrad, variables)

    times = {impl: [] for impl in runners}
    vtimes = {impl: [] for impl in runners}
    for _ in range(args.repeats):
        for impl, (epoch, state) in runners.items():
            t = time.perf_counter()
            s = state
            for _ in range(args.epochs):
                s, _ = epoch(s, idx)
            jax.block_until_ready(s)
            times[impl].append(time.perf_counter() - t)
            vgrad, v = vgrads[impl]
            t = time.perf_counter()
            for _ in range(20):
                out = vgrad(v, x[:100])
            jax.block_until_ready(out)
            vtimes[impl].append((time.perf_counter() - t) / 20)
    steps = 36 * args.epochs
    sps = {k: steps / statistics.median(v) for k, v in times.items()}
    vms = {k: 1e3 * statistics.median(v) for k, v in vtimes.items()}
    result = {
        "benchmark": "bench_conv",
        "train_steps_per_s_median": sps,
        "ratio_slices_over_lax_train": sps["slices"] / sps["lax"],
        "vmap8_grad_ms_median": vms,
        "ratio_lax_over_slices_vmap_time": vms["lax"] / vms["slices"],
        "environment": environment(),
    }
    print(json.dumps(result))
    print(f"\n{'conv':<10}{'train steps/s':>15}{'vmap(8) grad ms':>17}")
    for impl in ("lax", "slices"):
        print(f"{impl:<10}{sps[impl]:>15,.0f}{vms[impl]:>17.2f}")
    print(
        f"speed-up of slices: train {result['ratio_slices_over_lax_train']:.2f}x, "
        f"vmap {result['ratio_lax_over_slices_vmap_time']:.2f}x   device: {result['environment']['device_kind']}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
