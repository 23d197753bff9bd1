"""Memory and speed of sharded (fsdp) against replicated (data-parallel) training.

On 8 devices (simulated on the CPU unless the machine has them:
``--xla_force_host_platform_device_count``), the same `fit` of an MLP of about 10.5M
parameters (1024 -> 2048 -> 2048 -> 2048 -> 10) with Adam, on a mesh ``data=8``
(parameters and optimizer state replicated) and ``fsdp=8`` (split along the fsdp axis by
`jtricks.training.distributed.shard_spec`). Reported per arm: the bytes of parameters and
optimizer state held by one device (summed from the arrays' shards on device 0), the
compiled epoch program's memory analysis per device (arguments, outputs, temporaries:
XLA's own count, data included), and the median steps/s over ``--repeats`` (arms
alternating). Goal: sharded state bytes <= (1/8 + 10%) of replicated. On simulated CPU
devices the steps/s only say both run; on a GPU, ``--devices 1`` checks that the
sharded code path costs nothing on one device.

    python benchmarks/bench_fsdp.py                       # 8 simulated CPU devices
    python benchmarks/bench_fsdp.py --devices 1 --json-out fsdp-1.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="devices in the mesh (simulated on CPU)")
    p.add_argument("--features", default="2048,2048,2048")
    p.add_argument("--inputs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="steps per timed repeat (one epoch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if args.devices > 1 and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    if jax.device_count() < args.devices:
        sys.exit(f"bench_fsdp: {jax.device_count()} devices, {args.devices} asked")
    result = measure(args)
    print(json.dumps(result, indent=1))
    print(f"\n{result['parameters']:,} parameters, Adam, {args.devices} devices")
    print(f"{'mesh':<9} {'state MiB/device':>17} {'compiled MiB/device':>20} {'steps/s':>9}")
    for name, arm in result["arms"].items():
        print(
            f"{name:<9} {arm['state_bytes_per_device'] / 2**20:>17.2f} "
            f"{arm['compiled_bytes_per_device'] / 2**20:>20.2f} {arm['steps_per_s']:>9.2f}"
        )
    print(
        f"sharded / replicated state bytes: {result['state_bytes_ratio']:.4f} "
        f"(goal <= {result['goal_ratio']:.4f}); device: {result['environment']['device_kind']}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


def measure(args) -> dict:
    import jax
    import numpy as np
    import optax

    from jtricks.nn import MLP
    from jtricks.run import environment
    from jtricks.training import create_train_state, fit

    features = tuple(int(f) for f in args.features.split(","))
    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    x = rng.normal(size=(n, args.inputs)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    model = MLP(features=features, num_classes=10)
    tx = optax.adam(1e-3)
    meshes = {"data": f"data={args.devices}", "fsdp": f"fsdp={args.devices}"}
    arms = {name: memory_arm(spec, model, tx, x, y, args) for name, spec in meshes.items()}
    times = {name: [] for name in meshes}

    def timed(spec):
        state = create_train_state(model, tx, x, jax.random.key(0))
        t = time.perf_counter()
        state, _ = fit(
            state,
            (x, y),
            batch_size=args.batch_size,
            epochs=1,
            mesh=spec,
            data_key=jax.random.key(1),
        )
        jax.block_until_ready(state.params)
        return time.perf_counter() - t

    for spec in meshes.values():
        timed(spec)  # compiles
    for _ in range(args.repeats):
        for name, spec in meshes.items():
            times[name].append(timed(spec))
    for name in meshes:
        arms[name]["times_s"] = times[name]
        arms[name]["steps_per_s"] = args.steps / statistics.median(times[name])
    params = create_train_state(model, tx, x[:1], jax.random.key(0)).params
    ratio = arms["fsdp"]["state_bytes_per_device"] / arms["data"]["state_bytes_per_device"]
    return {
        "benchmark": "bench_fsdp",
        "devices": args.devices,
        "parameters": int(sum(np.size(a) for a in jax.tree.leaves(params))),
        "batch_size": args.batch_size,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "arms": arms,
        "state_bytes_ratio": ratio,
        "goal_ratio": 1 / args.devices * 1.1,
        "compiled_bytes_ratio": arms["fsdp"]["compiled_bytes_per_device"]
        / arms["data"]["compiled_bytes_per_device"],
        "steps_per_s_ratio": arms["fsdp"]["steps_per_s"] / arms["data"]["steps_per_s"],
        "environment": environment(),
    }


def memory_arm(spec: str, model, tx, x, y, args) -> dict:
    """The state's bytes on device 0 and XLA's memory analysis of the compiled epoch on
    the mesh ``spec``."""
    import jax
    import numpy as np

    from jtricks.training import create_train_state
    from jtricks.training.compiled import StepOptions, part_program
    from jtricks.training.distributed import batch_sharding, parse_mesh, place_state, replicate
    from jtricks.training.epoch import ArrayFeed

    mesh = parse_mesh(spec)
    state = place_state(create_train_state(model, tx, x, jax.random.key(0)), mesh)
    program = part_program(StepOptions(sharding=batch_sharding(mesh)))
    data, key = replicate((x, y), mesh), replicate(jax.random.key(1), mesh)
    feed = ArrayFeed(data, key, np.int32(0), np.int32(0), args.batch_size)
    compiled = program.lower(
        state, np.int32(0), feed, np.int32(args.steps), np.int32(20), length=args.steps, finish=True
    ).compile()
    memory = compiled.memory_analysis()
    return {
        "mesh": spec,
        "state_bytes_per_device": _bytes_on_device0((state.params, state.opt_state)),
        "compiled_bytes_per_device": int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        ),
        "compiled_argument_bytes": int(memory.argument_size_in_bytes),
        "compiled_temp_bytes": int(memory.temp_size_in_bytes),
    }


def _bytes_on_device0(tree) -> int:
    import jax

    device = jax.devices()[0]
    return sum(
        s.data.nbytes
        for a in jax.tree.leaves(tree)
        for s in getattr(a, "addressable_shards", ())
        if s.device == device
    )


if __name__ == "__main__":
    main()
