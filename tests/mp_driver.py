"""Run by tests/test_distributed.py: one process of a multi-process data-parallel run on
localhost CPU (``mp_driver.py PROCESS_ID NUM_PROCESSES PORT OUT``): writes the final
parameters (``OUT``, .npz) from process 0 and prints one JSON line. `train` with
``num_processes=0`` is the single-process reference on the concatenated shards (the test
runs it in its own process)."""

from __future__ import annotations

import json
import sys

import numpy as np


def train(process_id: int, num_processes: int) -> tuple[dict, dict]:
    """The run's final parameters (flat, by path) and its last epoch's record."""
    import jax
    import optax

    from jtricks.data import synthetic
    from jtricks.nn import build_model
    from jtricks.training import create_train_state, fit

    d = synthetic(num_train=160, num_test=40, shape=(16,), num_classes=4, noise=1.0, seed=0)
    shards = [(d.x_train[p::2], d.y_train[p::2]) for p in range(2)]
    if num_processes > 0:
        x, y = shards[process_id]  # this process loads only its own shard
    else:  # one process that sees both shards, in process order
        x = np.concatenate([s[0] for s in shards])
        y = np.concatenate([s[1] for s in shards])
    model = build_model("mlp(features=(32,), dropout=0.2)", 4)
    state = create_train_state(model, optax.adam(1e-2), x, jax.random.key(0))
    state, hist = fit(
        state,
        (x, y),
        val_data=(d.x_test, d.y_test),
        batch_size=40,
        steps=12,
        data_key=jax.random.key(1),
    )
    params = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(state.params)
    }
    return params, hist.records[-1]


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import jax

    from jtricks.training.processes import initialize

    initialize(f"localhost:{port}", nproc, pid)
    params, record = train(pid, nproc)
    if pid == 0:
        np.savez(out, **params)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "val_loss": record["val_loss"],
                "steps": record["step"],
            }
        )
    )


if __name__ == "__main__":
    main()
