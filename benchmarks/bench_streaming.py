"""Steps/s of `fit` on a stream of host batches against the on-device array path, in one run.

Two cases:

* ``cnn``: the MNIST-1D paper CNN (batch 100). The whole set fits on the device; the
  stream (`jtricks.data.stream.BatchStream`) reads the same batches on the host and feeds
  them in compiled chunks. The input pipeline is not the bottleneck here: the target is
  streaming >= 0.9x the array path.
* ``images``: a synthetic 32x32x3 image set (default 200,000 examples, uint8) written as
  memory-mapped ``.npy`` shards on disk (`jtricks.data.shards`), a small ResNet (batch
  128). The stream reads each batch from the shards and converts it to float32 on the
  host; the array path holds the whole float32 set in memory (2.4 GB at 200k), which is
  what streaming avoids.

Both arms train the same model from the same state on the same batches (the stream's
batches are the array path's, `EpochBatches`), alternately, ``--repeats`` times; the
headline is the median of steps / (time from the first dispatch to the last record),
the steady state of each path. The array path's data is put on the device once before
its calls, and that copy is reported apart (``array_copy_s``): it is the price of the
array path that streaming never pays, and it grows with the set. Compilation is left
out by a warm-up call of each.

Where the streaming time goes, measured in the same run: host decode (reading and
converting one batch), transfer (``device_put`` of one batch, waited for) and compute
(the array path's time per step). The feeder overlaps decode and transfer with compute
on its own thread; on a machine with few cores they compete for the same cores.

    python benchmarks/bench_streaming.py                      # both cases, CPU
    python benchmarks/bench_streaming.py --case images --images 50000 --loader grain
    python benchmarks/bench_streaming.py --json-out benchmarks/results/bench_streaming-cpu-2core.json

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from jtricks.data import Scaler, load_dataset, train_val_split
from jtricks.data.shards import write_shards
from jtricks.data.stream import BatchStream, EpochBatches
from jtricks.nn import build_model
from jtricks.run import environment
from jtricks.training import create_train_state, fit
from jtricks.training.streaming import default_chunk

IMAGE_MODEL = "mlp(features=(256,))"


def _epoch_seconds(history) -> float:
    """Time from the first dispatch to the last record: the sum of the records' epochs."""
    done, total = 0, 0.0
    for r in history:
        total += (r["step"] - done) / r["steps_per_s"]
        done = r["step"]
    return total


def _time_arm(make_state, train, steps: int, **kw) -> tuple[float, float]:
    """(epoch seconds, wall seconds including the call's setup) of one `fit` call."""
    t = time.perf_counter()
    state, history = fit(make_state(), train, steps=steps, **kw)
    jax.block_until_ready(state)
    return _epoch_seconds(history), time.perf_counter() - t


def _breakdown(batches: EpochBatches, chunk: int, n: int = 30) -> dict[str, float]:
    """Median seconds per batch of host decode and of the transfer to the device."""
    decode, transfer = [], []
    for i in range(n):
        t = time.perf_counter()
        batch = batches[i]
        decode.append(time.perf_counter() - t)
        stacked = jax.tree.map(lambda a: np.stack([a] * chunk), batch)
        t = time.perf_counter()
        jax.block_until_ready(jax.device_put(stacked))
        transfer.append((time.perf_counter() - t) / chunk)
    return {"decode_s": statistics.median(decode), "transfer_s": statistics.median(transfer)}


def _nbytes(tree) -> int:
    return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def run_case(name, model, train, make_stream, batch_size, steps, repeats, data_key):
    """Alternate the array and stream arms; returns the case's record."""
    x_example = np.asarray(train[0][:2]) if train is not None else None
    stream = make_stream()
    first = stream.batches[0]
    x_example = first[0][:2] if x_example is None else x_example

    tx = optax.adam(1e-3)  # one object: every call reuses the compiled programs

    def make_state():
        return create_train_state(model, tx, x_example, jax.random.key(0))

    chunk = default_chunk(first, len(stream))
    arms = {"stream": lambda: _time_arm(make_state, make_stream(), steps, chunk=chunk)}
    copy = {}
    if train is not None:  # the one-off copy of the whole set to the device, timed apart
        t = time.perf_counter()
        train = jax.block_until_ready(jax.device_put(train))
        copy = {"array_copy_s": time.perf_counter() - t, "array_bytes": _nbytes(train)}
        arms["array"] = lambda: _time_arm(
            make_state, train, steps, batch_size=batch_size, data_key=data_key
        )
    for arm in arms.values():  # compile
        arm()
    times = {k: [] for k in arms}
    for _ in range(repeats):
        for k, arm in arms.items():
            times[k].append(arm())
    out = {"case": name, "batch_size": batch_size, "steps_per_repeat": steps, "chunk": chunk}
    out.update(copy)
    for k, ts in times.items():
        out[f"{k}_steps_per_s_median"] = steps / statistics.median(t[0] for t in ts)
        out[f"{k}_wall_steps_per_s_median"] = steps / statistics.median(t[1] for t in ts)
        out[f"{k}_epoch_times_s"] = [t[0] for t in ts]
    if train is not None:
        out["ratio_stream_over_array"] = (
            out["stream_steps_per_s_median"] / out["array_steps_per_s_median"]
        )
        out["compute_s_per_step"] = 1 / out["array_steps_per_s_median"]
    out.update(_breakdown(stream.batches, chunk))
    return out


def mnist1d_case(args):
    data = load_dataset("mnist1d")
    x_tr, y_tr, _, _ = train_val_split(data.x_train, data.y_train, 0.1, seed=0, stratify=True)
    x_tr = Scaler.fit("standardize", x_tr)(x_tr)
    key = jax.random.key(1)
    return run_case(
        "cnn",
        build_model("cnn", data.num_classes),
        (x_tr, y_tr),
        lambda: BatchStream(EpochBatches((x_tr, y_tr), 100, key), loader=args.loader),
        100,
        args.cnn_steps,
        args.repeats,
        key,
    )


class _ToFloat:
    """Host decode of an image batch: uint8 -> float32 in [-1, 1], labels int32."""

    def __call__(self, batch):
        return (batch["x"].astype(np.float32) / 127.5 - 1.0), batch["y"].astype(np.int32)


def write_images(root: Path, n: int, shard_size: int = 10_000) -> None:
    """``n`` synthetic 32x32x3 uint8 images of 10 classes (a class template plus noise),
    written shard by shard."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (10, 32, 32, 3)).astype(np.float32)

    def shards():
        for s in range(0, n, shard_size):
            y = rng.integers(0, 10, min(shard_size, n - s))
            noise = rng.normal(0, 60, (len(y), 32, 32, 3))
            x = np.clip(0.5 * templates[y] + 64 + noise, 0, 255).astype(np.uint8)
            yield {"x": x, "y": y.astype(np.int32)}

    write_shards(root, shards())


def images_case(args, folder: Path):
    from jtricks.data.shards import ShardedArrays

    t = time.perf_counter()
    write_images(folder / "images", args.images)
    write_s = time.perf_counter() - t
    source = ShardedArrays(folder / "images")
    key = jax.random.key(1)

    def make_stream():
        batches = EpochBatches(source, 128, key, transform=_ToFloat())
        return BatchStream(batches, loader=args.loader)

    train = None
    if not args.no_array:
        everything = source.gather(np.arange(len(source)))
        train = _ToFloat()(everything)
    out = run_case(
        "images",
        build_model(args.image_model, 10),
        train,
        make_stream,
        128,
        args.image_steps,
        args.repeats,
        key,
    )
    out.update(
        images=args.images,
        model=args.image_model,
        shards_bytes=sum(p.stat().st_size for p in (folder / "images").iterdir()),
        write_s=write_s,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=("cnn", "images", "all"), default="all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cnn-steps", type=int, default=720, help="steps per timed cnn call")
    p.add_argument("--image-steps", type=int, default=300, help="steps per timed images call")
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--image-model", default=IMAGE_MODEL)
    p.add_argument("--loader", choices=("python", "grain"), default="python")
    p.add_argument("--no-array", action="store_true", help="images: skip the in-memory arm")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    cases = []
    if args.case in ("cnn", "all"):
        cases.append(mnist1d_case(args))
    if args.case in ("images", "all"):
        with tempfile.TemporaryDirectory() as folder:
            cases.append(images_case(args, Path(folder)))
    result = {
        "benchmark": "bench_streaming",
        "loader": args.loader,
        "repeats": args.repeats,
        "cases": cases,
        "environment": environment(),
    }
    print(json.dumps(result))
    print(
        f"\n{'case':<8}{'array st/s':>12}{'stream st/s':>13}{'ratio':>8}"
        f"{'decode ms':>11}{'transfer ms':>13}{'compute ms':>12}"
    )
    for c in cases:
        array = c.get("array_steps_per_s_median", float("nan"))
        print(
            f"{c['case']:<8}{array:>12,.1f}{c['stream_steps_per_s_median']:>13,.1f}"
            f"{c.get('ratio_stream_over_array', float('nan')):>8.3f}"
            f"{1e3 * c['decode_s']:>11.3f}{1e3 * c['transfer_s']:>13.3f}"
            f"{1e3 * c.get('compute_s_per_step', float('nan')):>12.3f}"
        )
    for c in cases:
        if "array_copy_s" in c:
            print(
                f"{c['case']}: the array path first copies {c['array_bytes'] / 2**20:,.0f} MiB "
                f"to the device in {c['array_copy_s']:.2f} s"
            )
    print(f"device: {result['environment']['device_kind']}   loader: {args.loader}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
