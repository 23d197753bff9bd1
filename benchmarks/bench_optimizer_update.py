"""Optimizer update cost against the number of parameter leaves: jtricks fused, jtricks
unfused and optax, with the total number of parameters fixed.

For each optimizer (adam, sgd with momentum, global-norm clip + adamw) and leaf count
(1, 64, 512, 2048 equal leaves of shape ``(total / leaves / 256, 256)``):

* ``call``: one jit call of ``(params, opt_state, grads) -> (params, opt_state)`` (update and
  apply; params and state donated and fed back), dispatch included: what a per-step
  Python loop pays;
* ``scan``: the same update ``--scan-steps`` times inside one `lax.scan`, per update: what a
  compiled epoch pays;
* ``compile``: lower + compile time of the ``call`` function.

Implementations (all from the same specs):

* ``optax``: `optax.adam` / `optax.sgd(momentum=)` / `optax.chain(clip_by_global_norm, adamw)`;
* ``jtricks``: `jtricks.optim.build_optimizer` on the parameter tree (what `fit` runs without
  ``--fused``);
* ``fused``: `jtricks.optim.fused` with `Flat` parameters and gradients, as the train step
  holds them with ``--fused`` (the gradient of a loss of ``flat.unflatten()`` is `Flat`);
* ``fused_tree``: `fused` given trees, flattening at the boundary (a drop-in for optax code).

Every time is also given as a ratio to the 1-leaf optax time of the same optimizer and
mode, measured in the same run. ``dispatch`` is a jit call that only passes the same
params and state through (the per-call cost that grows with the number of arrays). Timed arms alternate within each round; medians over
``--repeats`` rounds. ``fusions`` counts the fusion kernels in the compiled ``call``
program (XLA's per-leaf kernels are the cause of the per-leaf cost on a GPU).

    python benchmarks/bench_optimizer_update.py                       # CPU: 2^22 parameters
    python benchmarks/bench_optimizer_update.py --total 67108864      # the GPU probe's 64M

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.optim import build_optimizer, flatten_params, fused
from jtricks.run import environment

OPTIMIZERS = {
    "adam": (lambda: optax.adam(1e-3), "adam(lr=1e-3)"),
    "momentum": (lambda: optax.sgd(1e-2, momentum=0.9), "momentum(lr=1e-2, form='torch')"),
    "clip_adamw": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4)),
        "adamw(lr=1e-3, weight_decay=1e-4) | clip_global_norm(1.0)",
    ),
}
IMPLS = ("optax", "jtricks", "fused", "fused_tree")


def _tree(total: int, leaves: int, seed: int) -> dict:
    per = total // leaves
    shape = (per // 256, 256) if per % 256 == 0 and per >= 256 else (per,)
    key = jax.random.key(seed)
    flat = jax.random.normal(key, (leaves, *shape), jnp.float32)
    return {f"p{i:04d}": flat[i] for i in range(leaves)}


def _fusions(compiled_text: str) -> int:
    return len(re.findall(r"\bfusion(?:\.\d+)?\(", compiled_text)) or compiled_text.count(
        " fusion("
    )


def _case(opt: str, impl: str, leaves: int, total: int, scan_steps: int):
    make_optax, spec = OPTIMIZERS[opt]
    params = _tree(total, leaves, 0)
    grads = jax.tree.map(lambda p: p * 1e-2, params)
    tx = make_optax() if impl == "optax" else build_optimizer(spec)
    if impl.startswith("fused"):
        tx = fused(tx)
    if impl == "fused":
        params, grads = flatten_params(params), flatten_params(grads)
    state = tx.init(params)

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def many(p, s, g):
        def body(carry, _):
            return update(*carry, g), None

        return jax.lax.scan(body, (p, s), None, length=scan_steps)[0]

    t0 = time.perf_counter()
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    fusions = _fusions(compiled.as_text())
    call = compiled  # the AOT-compiled program, so it is compiled once
    scan = jax.jit(many, donate_argnums=(0, 1))
    passthrough = jax.jit(lambda p, s, g: (p, s), donate_argnums=(0, 1))
    args = [params, state, grads]
    for _ in range(2):
        _time(call, args, 1)
        _time(scan, args, 1)
        _time(passthrough, args, 1)
    return {
        "passthrough": passthrough,
        "args": args,
        "call": call,
        "scan": scan,
        "compile_s": compile_s,
        "fusions": fusions,
        "buffers": len(jax.tree.leaves(params)),
    }


def _time(fn, args: list, inner: int) -> float:
    """Seconds per call of ``inner`` chained calls; params and state are donated and fed
    back (as in a training loop), so ``args`` is updated in place."""
    p, s, g = args
    t = time.perf_counter()
    for _ in range(inner):
        p, s = fn(p, s, g)
    jax.block_until_ready((p, s))
    dt = (time.perf_counter() - t) / inner
    args[0], args[1] = p, s
    return dt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total", type=int, default=1 << 22, help="parameters in all (fixed)")
    p.add_argument("--leaves", default="1,64,512,2048")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--scan-steps", type=int, default=20)
    p.add_argument("--calls", type=int, default=5, help="jit calls per timed call sample")
    p.add_argument("--repeats", type=int, default=9, help="rounds (medians over these)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.leaf_counts = leaf_counts = [int(v) for v in args.leaves.split(",")]
    args.opts = opts = [o.strip() for o in args.optimizers.split(",")]
    args.impl_list = impls = [i.strip() for i in args.impls.split(",")]
    for o in opts:
        if o not in OPTIMIZERS:
            p.error(f"--optimizers: unknown {o!r}; valid: {', '.join(OPTIMIZERS)}")
    for i in impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown {i!r}; valid: {', '.join(IMPLS)}")
    if "optax" not in impls or 1 not in leaf_counts:
        p.error("the baseline (optax at 1 leaf) must be measured in the same run")
    for n in leaf_counts:
        if n < 1 or args.total % n:
            p.error(f"--leaves: {n} must divide --total={args.total}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    leaf_counts, opts, impls = args.leaf_counts, args.opts, args.impl_list

    rows = []
    for opt in opts:
        cases = {}
        for n in leaf_counts:
            for impl in impls:
                cases[(impl, n)] = _case(opt, impl, n, args.total, args.scan_steps)
        times = {k: {"call": [], "scan": [], "dispatch": []} for k in cases}
        for _ in range(args.repeats):  # arms alternate within a round
            for k, c in cases.items():
                times[k]["call"].append(_time(c["call"], c["args"], args.calls))
                times[k]["scan"].append(_time(c["scan"], c["args"], 1) / args.scan_steps)
                times[k]["dispatch"].append(_time(c["passthrough"], c["args"], args.calls))
        base = {m: statistics.median(times[("optax", 1)][m]) for m in ("call", "scan")}
        for (impl, n), c in cases.items():
            call = statistics.median(times[(impl, n)]["call"])
            scan = statistics.median(times[(impl, n)]["scan"])
            dispatch = statistics.median(times[(impl, n)]["dispatch"])
            rows.append(
                {
                    "optimizer": opt,
                    "impl": impl,
                    "leaves": n,
                    "buffers": c["buffers"],
                    "call_ms": call * 1e3,
                    "scan_ms": scan * 1e3,
                    "call_ratio": call / base["call"],
                    "scan_ratio": scan / base["scan"],
                    "dispatch_ms": dispatch * 1e3,
                    "compile_s": c["compile_s"],
                    "fusions": c["fusions"],
                    "call_ms_samples": [t * 1e3 for t in times[(impl, n)]["call"]],
                    "scan_ms_samples": [t * 1e3 for t in times[(impl, n)]["scan"]],
                }
            )
        del cases
    env = environment()
    result = {
        "benchmark": "bench_optimizer_update",
        "total_params": args.total,
        "scan_steps": args.scan_steps,
        "repeats": args.repeats,
        "calls_per_sample": args.calls,
        "baseline": "optax, 1 leaf, same optimizer and mode, same run",
        "rows": rows,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "environment": env,
    }
    print(json.dumps(result))
    print(
        f"\n{args.total:,} parameters; ratios against optax at 1 leaf; device {env['device_kind']}"
    )
    print(
        f"{'optimizer':<11}{'impl':<11}{'leaves':>7}{'call ms':>10}{'x':>7}"
        f"{'scan ms':>10}{'x':>7}{'compile s':>11}{'fusions':>9}{'dispatch ms':>13}"
    )
    for r in rows:
        print(
            f"{r['optimizer']:<11}{r['impl']:<11}{r['leaves']:>7}{r['call_ms']:>10.3f}"
            f"{r['call_ratio']:>7.2f}{r['scan_ms']:>10.3f}{r['scan_ratio']:>7.2f}"
            f"{r['compile_s']:>11.2f}{r['fusions']:>9}{r['dispatch_ms']:>13.3f}"
        )
    # the CPU target: fused no slower than optax at any leaf count
    print("\nfused / optax at the same leaf count (call, scan):")
    for opt in opts:
        for n in leaf_counts:
            get = {r["impl"]: r for r in rows if r["optimizer"] == opt and r["leaves"] == n}
            if "fused" in get:
                print(
                    f"  {opt:<11}{n:>6} leaves: "
                    f"{get['fused']['call_ms'] / get['optax']['call_ms']:.2f}  "
                    f"{get['fused']['scan_ms'] / get['optax']['scan_ms']:.2f}"
                )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
