"""Train from shards on disk through a stream, and end exactly where the in-memory path ends.

The MNIST-1D training split is written as memory-mapped ``.npy`` shards
(`jtricks.data.write_shards`), read back batch by batch by a `BatchStream` (jtricks'
background thread, or Grain with ``--loader grain``) and fed to the device in compiled
chunks. The same paper CNN is trained on the arrays in memory and on the stream; the
stream's batches are the array path's, so the two runs end with bit-identical
parameters. A third run stops halfway and continues from the record's ``data_state``
(what a checkpoint keeps), and ends there too.

    python examples/streaming.py                 # 20 epochs, the Python loader
    python examples/streaming.py --loader grain  # needs pip install 'jtricks[grain]'
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jtricks.data import (
    BatchStream,
    EpochBatches,
    Scaler,
    ShardedArrays,
    load_dataset,
    train_val_split,
    write_shards,
)
from jtricks.nn import CNN1D
from jtricks.training import create_train_state, fit


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--loader", choices=("python", "grain"), default="python")
    args = p.parse_args(argv)

    data = load_dataset("mnist1d")
    x, y, x_val, y_val = train_val_split(data.x_train, data.y_train, 0.1, seed=0, stratify=True)
    scale = Scaler.fit("standardize", x)
    x, x_val = scale(x), scale(x_val)
    tx, key, data_key = optax.adam(1e-2), jax.random.key(0), jax.random.key(1)

    def new_state():
        return create_train_state(CNN1D(), tx, x[:2], key)

    common = dict(val_data=(x_val, y_val), data_key=data_key)
    t = time.perf_counter()
    in_memory, h_mem = fit(new_state(), (x, y), batch_size=100, epochs=args.epochs, **common)
    t_mem = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        write_shards(Path(folder) / "train", {"x": x, "y": y}, shard_size=1000)
        source = ShardedArrays(Path(folder) / "train")  # memory-mapped: nothing loaded whole

        def stream():
            return BatchStream(
                EpochBatches(source, 100, data_key, transform=_as_tuple), loader=args.loader
            )

        t = time.perf_counter()
        streamed, h_str = fit(new_state(), stream(), epochs=args.epochs, **common)
        t_str = time.perf_counter() - t
        half = args.epochs // 2
        first, h1 = fit(new_state(), stream(), epochs=half, **common)
        resumed, _ = fit(
            first, stream(), epochs=args.epochs - half, data_state=h1[-1]["data_state"], **common
        )
    same = _identical(in_memory.params, streamed.params)
    same_resumed = _identical(in_memory.params, resumed.params)
    print(f"{len(source)} training examples in {len(source.arrays['x'])} shards, batch 100")
    print(f"in memory : val_loss {h_mem[-1]['val_loss']:.4f}  fit {t_mem:.1f} s")
    print(f"streamed  : val_loss {h_str[-1]['val_loss']:.4f}  fit {t_str:.1f} s  ({args.loader})")
    print(f"identical parameters: {same}")
    print(f"stopped at epoch {half}, data_state {h1[-1]['data_state']}, continued: {same_resumed}")
    return {
        "val_loss_memory": h_mem[-1]["val_loss"],
        "val_loss_stream": h_str[-1]["val_loss"],
        "identical": same,
        "identical_resumed": same_resumed,
    }


def _as_tuple(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Shards hold fields ``x`` and ``y``; the in-memory path trains on ``(x, y)``."""
    return batch["x"], batch["y"]


def _identical(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


if __name__ == "__main__":
    main()
