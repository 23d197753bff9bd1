"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``); prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtricks.data import synthetic
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit
from jtricks.training.distributed import batch_sharding, data_mesh


def run(model_spec: str, mesh, steps: int = 12):
    d = synthetic(num_train=160, num_test=40, shape=(16,), num_classes=4, noise=1.0, seed=0)
    model = build_model(model_spec, 4)
    state = create_train_state(model, optax.adam(1e-2), d.x_train, jax.random.key(0))
    state, hist = fit(
        state,
        (d.x_train, d.y_train),
        val_data=(d.x_test, d.y_test),
        batch_size=40,
        steps=steps,
        data_key=jax.random.key(1),
        mesh=mesh,
    )
    return state, hist


def run_stream(model_spec: str, mesh, steps: int = 12):
    """The same run fed as a stream of host batches (chunks of 5 steps, sharded on the way)."""
    from jtricks.data.stream import BatchStream, EpochBatches

    d = synthetic(num_train=160, num_test=40, shape=(16,), num_classes=4, noise=1.0, seed=0)
    model = build_model(model_spec, 4)
    state = create_train_state(model, optax.adam(1e-2), d.x_train, jax.random.key(0))
    stream = BatchStream(EpochBatches((d.x_train, d.y_train), 40, jax.random.key(1)))
    state, _ = fit(state, stream, val_data=(d.x_test, d.y_test), steps=steps, mesh=mesh, chunk=5)
    return state


def run_lm(mesh, steps: int = 8):
    """A language model on a dict batch with a padding mask: any task, any batch, on a mesh."""
    from jtricks.data import load_dataset

    d = load_dataset("tokens(num_train=160, num_test=40, seq_len=8, vocab=6)")
    mask = (np.arange(8)[None] < np.arange(160)[:, None] % 8 + 1).astype(np.float32)
    batch = {"tokens": d.x_train, "y": d.y_train, "mask": mask}
    model = build_model("transformer_lm(d_model=16, heads=2, layers=1)", 6)
    # SGD: Adam's first steps are about lr * sign(g), so for gradients near zero they turn
    # the rounding differences of two summation orders into differences of order lr
    state = create_train_state(model, optax.sgd(0.5), d.x_train, jax.random.key(0))
    state, _ = fit(
        state, batch, task="lm", batch_size=40, steps=steps, data_key=jax.random.key(1), mesh=mesh
    )
    return state


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
    )


def main() -> None:
    out = {"devices": jax.device_count()}
    mesh = data_mesh()
    for name, spec in (
        ("plain", "mlp(features=(32,))"),
        ("dropout", "mlp(features=(32,), dropout=0.3)"),
    ):
        sharded, hist = run(spec, "auto")
        single, _ = run(spec, None)
        leaf = jax.tree.leaves(sharded.params)[0]
        out[name] = {
            "max_abs_diff": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(
                    jax.tree.leaves(sharded.params), jax.tree.leaves(single.params), strict=True
                )
            ),
            "param_sharding_replicated": bool(leaf.sharding.is_fully_replicated),
            "param_devices": len(leaf.sharding.device_set),
            "val_loss": hist.records[-1]["val_loss"],
        }
    # dropout masks per device: one input row repeated; every device's slice of the output
    model = build_model("mlp(features=(64,), dropout=0.5)", 4)
    x = jnp.ones((64, 16))
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def forward(v, x, key):
        x = jax.lax.with_sharding_constraint(x, batch_sharding(mesh))
        return model.apply(v, x, train=True, rngs={"dropout": key})

    y = forward(variables, jax.device_put(x, batch_sharding(mesh)), jax.random.key(7))
    shards = [
        np.asarray(s.data) for s in sorted(y.addressable_shards, key=lambda s: s.index[0].start)
    ]
    firsts = [s[0] for s in shards]
    out["mask_rows_distinct_across_devices"] = len({tuple(np.round(f, 5)) for f in firsts}) == len(
        firsts
    )
    out["num_shards"] = len(shards)
    single = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(7)})
    out["masks_same_as_one_device"] = bool(
        np.allclose(np.asarray(y), np.asarray(single), atol=1e-6)
    )
    out["lm_dict_max_abs_diff"] = _max_diff(run_lm("auto"), run_lm(None))
    spec = "mlp(features=(32,), dropout=0.3)"
    out["stream_max_abs_diff"] = _max_diff(run_stream(spec, "auto"), run(spec, None)[0])
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
