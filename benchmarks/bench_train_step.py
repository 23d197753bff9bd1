"""End-to-end training throughput: a hand-written Flax + optax step against jtricks `fit`,
with and without the fused optimizer (``--fused``), in one run.

Arms (same model, same optimizer rule, same precision, same device-resident batches):

* ``hand_loop``: the hand-written jitted step of ``baselines/flax_step.py`` called once per
  batch from Python (the usual Flax + optax style: ``value_and_grad``, ``tx.update``,
  ``apply_updates``);
* ``hand_scan``: the same step inside one `lax.scan` per epoch;
* ``fit``: `jtricks.training.fit` (one compiled `lax.scan` per epoch, gradient norm and
  non-finite guard on, no validation);
* ``fit_fused``: the same with `jtricks.optim.fused` (flat parameters inside the epoch).

Compilation excluded (a warm-up epoch each); arms alternate; medians over ``--repeats``;
each repeat times ``--epochs`` epochs. Every arm shuffles every epoch inside the timed
region, with the same `jtricks.data.epoch_indices` (a permutation costs a few
milliseconds on a 2-core CPU; before 2026-12-04 the hand-written arms drew theirs before
the clock started). The hand-written arms use `optax.sgd` with Nesterov
momentum, jtricks the same rule from ``momentum(form='torch', nesterov=True)``. With
``--precision bf16`` the parameters and inputs are cast to bfloat16 for the forward and
backward pass in every arm (float32 master weights).

    python benchmarks/bench_train_step.py                     # CPU: paper CNN, MNIST-1D shape
    python benchmarks/bench_train_step.py --model resnet18 --shape 32,32,3 \\
        --batch-size 512 --precision bf16                     # GPU: the issue's ResNet-18
    python benchmarks/bench_train_step.py --vocab 16 --shape 32 --batch-size 50 \\
        --model "transformer_lm(d_model=64, heads=4, layers=2)"  # a causal LM on tokens

With ``--vocab V`` the examples are token sequences of length ``--shape`` and the targets
the next tokens (the language-model task: `fit` gets ``task="lm"``, the hand-written arms
the same mean token cross-entropy).

Also reported: the FLOPs of one step (XLA's cost analysis of the hand-written step's
lowered module, before the GPU passes hide convolutions in cuDNN calls; the same work in
every arm), each arm's TFLOP/s, its MFU against the datasheet peak of the
device (`jtricks.bench.device`; ``--peak-tflops`` for another) and its fraction of the
matmul rate measured on the same device in the same run.

Prints JSON (one object) then a short table; ``ratio`` = images/s against ``hand_scan``.
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
from timing import time_arms, write_result

from baselines import flax_step
from jtricks.bench.device import lowered_flops, matmul_flops, peak_flops
from jtricks.data import epoch_indices
from jtricks.nn import build_model
from jtricks.optim import build_optimizer, fused
from jtricks.run import environment
from jtricks.training import create_train_state, fit

ARMS = ("hand_loop", "hand_scan", "fit", "fit_fused")


def _utilisation(step, carry, idx, args, env: dict, ips: dict, batch: int) -> dict:
    """FLOPs of one step (XLA's cost analysis of the hand-written step's lowered module,
    `lowered_flops`, the same work in every arm, convolutions counted on a GPU too), the
    achieved TFLOP/s of each arm, and MFU against the datasheet peak
    (`jtricks.bench.device`, or ``--peak-tflops``) and against this device's measured
    matmul rate in the same dtype."""
    flops = lowered_flops(jax.jit(step).lower(carry, idx)) or float("nan")
    peak = args.peak_tflops or (peak_flops(env["device_kind"], args.precision) or 0) / 1e12
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    measured = matmul_flops(dtype, 8192 if env["platform"] == "gpu" else 512, 5) / 1e12
    tflops = {a: flops * v / batch / 1e12 for a, v in ips.items()}
    return {
        "flops_per_step": flops,
        "peak_tflops": peak or None,
        "matmul_tflops": measured,
        "tflops": tflops,
        "mfu": {a: v / peak for a, v in tflops.items()} if peak else {},
        "fraction_of_matmul": {a: v / measured for a, v in tflops.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--shape", default="40", help="example shape, e.g. 40 or 32,32,3")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--vocab", type=int, default=None, help="token sequences of this vocabulary")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.arm_list = arms = [a.strip() for a in args.arms.split(",")]
    for a in arms:
        if a not in ARMS:
            p.error(f"--arms: unknown {a!r}; valid: {', '.join(ARMS)}")
    if "hand_scan" not in arms:
        p.error("--arms must include the baseline hand_scan")
    return args


def make_data(args: argparse.Namespace):
    """Random inputs and labels (or token sequences with ``--vocab``), the model and its task."""
    shape = tuple(int(s) for s in args.shape.split(","))
    n = args.batch_size * args.steps_per_epoch
    rng = np.random.default_rng(0)
    if args.vocab is None:
        x = jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, args.num_classes, n).astype(np.int32))
        return x, y, build_model(args.model, args.num_classes), "classification", shape
    seq = rng.integers(0, args.vocab, (n, shape[0] + 1)).astype(np.int32)
    x, y = jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])
    return x, y, build_model(args.model, args.vocab), "lm", shape


def hand_arms(args, model, x, y, key):
    """The hand-written Flax + optax step (benchmarks/baselines/flax_step.py), run one
    compiled call per step (``hand_loop``) or one scan per epoch (``hand_scan``); both
    shuffle every epoch inside the timed region, as fit does. Also the step and carry."""
    B, spe, n = args.batch_size, args.steps_per_epoch, x.shape[0]
    compute = jnp.bfloat16 if args.precision == "bf16" else None
    h_tx = optax.sgd(LR, momentum=0.9, nesterov=True)
    h_step = flax_step.make_step(model, h_tx, x, y, compute)
    h_one = jax.jit(h_step, donate_argnums=0)

    def shuffle(e):  # the epoch's batches, drawn as fit draws them (the same work)
        return epoch_indices(jax.random.fold_in(key, e), n, B, spe)

    h_shuffle = jax.jit(shuffle)
    h_epoch = jax.jit(lambda c, e: jax.lax.scan(h_step, c, shuffle(e)), donate_argnums=0)

    def h_init():
        return flax_step.init_carry(model, h_tx, x, key)

    def run_hand_loop():
        c = jax.tree.map(jnp.copy, h_init())
        t = time.perf_counter()
        for e in range(args.epochs):
            idx = h_shuffle(np.int32(e))
            for i in range(spe):
                c, loss = h_one(c, idx[i])
        jax.block_until_ready((c, loss))
        return time.perf_counter() - t

    def run_hand_scan():
        c = jax.tree.map(jnp.copy, h_init())
        t = time.perf_counter()
        for e in range(args.epochs):
            c, losses = h_epoch(c, np.int32(e))
        jax.block_until_ready((c, losses))
        return time.perf_counter() - t

    arms = {"hand_loop": run_hand_loop, "hand_scan": run_hand_scan}
    return arms, h_step, h_init(), shuffle(0)[0]


def fit_arms(args, model, task, x, y, key):
    """`fit` with the optimizer as built by name, and with its fused form."""
    tx = build_optimizer(f"momentum(lr={LR}, gamma=0.9, form='torch', nesterov=True)")
    fused_tx = fused(tx)  # one object: the optimizer is part of the compiled program's key

    def run_fit(use_fused: bool):
        state = create_train_state(model, fused_tx if use_fused else tx, x[:1], key)
        t = time.perf_counter()
        state, _ = fit(
            state,
            (x, y),
            batch_size=args.batch_size,
            epochs=args.epochs,
            data_key=key,
            precision=args.precision,
            task=task,
        )
        jax.block_until_ready(state)
        return time.perf_counter() - t

    return {"fit": lambda: run_fit(False), "fit_fused": lambda: run_fit(True)}


LR = 0.01


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    x, y, model, task, shape = make_data(args)
    key = jax.random.key(0)
    hand, h_step, carry, first_batch = hand_arms(args, model, x, y, key)
    fns = {**hand, **fit_arms(args, model, task, x, y, key)}
    fns = {a: fns[a] for a in args.arm_list}
    times = time_arms(fns, args.repeats)
    images = args.epochs * args.steps_per_epoch * args.batch_size
    ips = {a: images / statistics.median(v) for a, v in times.items()}
    env = environment()
    params0 = carry[0]
    result = {
        "benchmark": "bench_train_step",
        "model": args.model,
        "task": task,
        "shape": shape,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "param_leaves": len(jax.tree.leaves(params0)),
        "params": int(sum(v.size for v in jax.tree.leaves(params0))),
        "images_per_repeat": images,
        "repeats": args.repeats,
        "images_per_s": ips,
        "ratio_vs_hand_scan": {a: ips[a] / ips["hand_scan"] for a in fns},
        "seconds": times,
        **_utilisation(h_step, carry, first_batch, args, env, ips, args.batch_size),
        "environment": env,
    }
    report(result, args)
    return result


def report(result: dict, args: argparse.Namespace) -> None:
    """The JSON line, the table, and the JSON file when asked."""
    ips, util, env = result["images_per_s"], result, result["environment"]
    print(json.dumps(result))
    print(
        f"\n{args.model} {result['shape']} batch {args.batch_size} {args.precision}, "
        f"{result['param_leaves']} parameter leaves; device {env['device_kind']}"
    )
    print(f"{'arm':<12}{'images/s (median)':>19}{'ratio':>8}{'TFLOP/s':>10}{'MFU':>8}")
    for a in ips:
        mfu = util["mfu"].get(a)
        print(
            f"{a:<12}{ips[a]:>19,.0f}{ips[a] / ips['hand_scan']:>8.3f}"
            f"{util['tflops'][a]:>10.3f}{'' if mfu is None else f'{mfu:.1%}':>8}"
        )
    write_result(result, args.json_out)


if __name__ == "__main__":
    main()
