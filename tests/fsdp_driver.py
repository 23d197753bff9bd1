"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices: sharded
(fsdp) training against one device; prints one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile

import jax
import numpy as np
import optax

from jtricks.data.stream import BatchStream, EpochBatches
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit
from jtricks.training.checkpoint import list_checkpoints, restore
from jtricks.training.distributed import MIN_SHARDED, parse_mesh, place_state, shard_spec

rng = np.random.default_rng(0)
X = rng.normal(size=(160, 64)).astype(np.float32)
Y = rng.integers(0, 4, 160).astype(np.int32)


def run(model_spec, tx, mesh, stream=False):
    model = build_model(model_spec, 4)
    state = create_train_state(model, tx, X, jax.random.key(0))
    if stream:
        data = BatchStream(EpochBatches((X, Y), 40, jax.random.key(1)))
        return fit(state, data, steps=12, chunk=5, mesh=mesh, val_data=(X, Y))
    return fit(state, (X, Y), batch_size=40, steps=12, data_key=jax.random.key(1), mesh=mesh,
               val_data=(X, Y))  # fmt: skip


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def follows_rule(tree, mesh) -> bool:
    """Every array of ``tree`` lies where `shard_spec` says."""
    return all(
        a.sharding.spec == shard_spec(a.shape, mesh) and a.sharding.mesh.shape == mesh.shape
        for a in jax.tree.leaves(tree)
        if isinstance(a, jax.Array)
    )


def bytes_per_device(tree) -> int:
    """The bytes of ``tree``'s arrays that device 0 holds."""
    device = jax.devices()[0]
    return sum(
        s.data.nbytes
        for a in jax.tree.leaves(tree)
        if isinstance(a, jax.Array)
        for s in a.addressable_shards
        if s.device == device
    )


def main() -> None:
    out = {"devices": jax.device_count(), "cases": {}}
    wide = "mlp(features=(256, 256))"
    cases = [  # each mesh once: a 2-D mesh and a pure FSDP one
        ("sgd", wide, optax.sgd(0.1), ("fsdp=8",)),
        ("adam", wide, optax.adam(1e-2), ("data=4,fsdp=2", "fsdp=8")),
        (
            "batchnorm_dropout",
            "mlp(features=(256, 256), norm='batch', dropout=0.2)",
            optax.sgd(0.1),
            ("data=4,fsdp=2",),
        ),
    ]
    states = {}
    for name, spec, tx, meshes in cases:
        one, h1 = run(spec, tx, None)
        for axes in meshes:
            mesh = parse_mesh(axes)
            state, h = states[name, axes] = run(spec, tx, axes)
            out["cases"][f"{name} {axes}"] = {
                "max_abs_diff": max_diff(one.params, state.params),
                "stats_diff": max_diff(one.batch_stats, state.batch_stats) if one.batch_stats else 0.0,
                "val_loss": [h1[-1]["val_loss"], h[-1]["val_loss"]],
                "follows_rule": follows_rule((state.params, state.opt_state, state.batch_stats), mesh),
                "sharded_leaves": sum(
                    a.sharding.spec != jax.sharding.PartitionSpec() for a in jax.tree.leaves(state.params)
                ),
            }  # fmt: skip
    one, _ = run(wide, optax.adam(1e-2), None, stream=True)
    streamed, _ = run(wide, optax.adam(1e-2), "data=2,fsdp=4", stream=True)
    out["stream_max_abs_diff"] = max_diff(one.params, streamed.params)
    replicated, _ = run(wide, optax.adam(1e-2), "data=8")
    sharded = states["adam", "fsdp=8"][0]
    out["bytes_replicated"] = bytes_per_device((replicated.params, replicated.opt_state))
    out["bytes_sharded"] = bytes_per_device((sharded.params, sharded.opt_state))
    out["bytes_kept_whole"] = sum(  # leaves too small for the rule to shard
        a.nbytes
        for a in jax.tree.leaves((replicated.params, replicated.opt_state))
        if isinstance(a, jax.Array) and a.size < MIN_SHARDED
    )
    out["cli"] = cli()
    print(json.dumps(out))


def cli() -> dict:
    """`jtricks train --mesh data=4,fsdp=2` with checkpoints; the last checkpoint restores
    onto one device (a plain target) equal to the run's final parameters."""
    import jtricks

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(dataset="synthetic(num_train=400, num_test=40, shape=(64,), num_classes=4, noise=3.0)",
                  model="mlp(features=(256,))", batch_size=40, epochs=3, checkpoint_every=1)  # fmt: skip
        result = jtricks.train(out=f"{tmp}/run", mesh="data=4,fsdp=2", **kw)
        plain = jtricks.train(mesh="data=8", **kw)
        target = jax.device_put(result.state, jax.devices()[0])  # the same, on one device
        target = target.replace(params=jax.tree.map(jax.numpy.zeros_like, target.params))
        last = list_checkpoints(f"{tmp}/run/checkpoints")[-1]
        restored, _ = restore(last, target)
        four = place_state(target, parse_mesh("fsdp=4", jax.devices()[:4]))
        on_four, _ = restore(last, four)  # saved from 8 devices, restored sharded onto 4
        return {
            "checkpoint": last.name,
            "restored_diff": max_diff(restored.params, result.state.params),
            "restored_devices": len(jax.tree.leaves(restored.params)[0].sharding.device_set),
            "four_diff": max_diff(on_four.params, result.state.params),
            "four_devices": sorted(
                {len(a.sharding.device_set) for a in jax.tree.leaves(on_four.params)}
            ),
            "four_follows_rule": follows_rule(
                on_four.params, parse_mesh("fsdp=4", jax.devices()[:4])
            ),
            "test_loss": [result.test["loss"], plain.test["loss"]],
        }


if __name__ == "__main__":
    sys.exit(main())
