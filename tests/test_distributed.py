"""Data parallelism (8 simulated devices, 2 processes), gradient accumulation, bf16 (T29)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.data.shards import write_shards
from jtricks.nn import build_model
from jtricks.training import create_train_state, fit, make_train_step

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    """This process's environment with ``extra``; ``XLA_FLAGS`` are added to this
    process's (the tests' light optimisation level, `tests/conftest.py`), not replaced."""
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), extra.pop("XLA_FLAGS", "")]).strip()
    env = {**os.environ, **extra, "XLA_FLAGS": flags}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_eight_simulated_devices_match_one_device():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dp_driver.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for case in ("plain", "dropout"):
        assert out[case]["param_devices"] == 8 and out[case]["param_sharding_replicated"]
        assert out[case]["max_abs_diff"] < 1e-5, out[case]
    # dropout: every device draws its own masks, and the seed gives the masks of one device
    assert out["num_shards"] == 8 and out["mask_rows_distinct_across_devices"]
    assert out["masks_same_as_one_device"]
    # a language model on a dict batch with a mask trains alike on 8 devices and on 1
    assert out["lm_dict_max_abs_diff"] < 1e-4, out["lm_dict_max_abs_diff"]
    # a stream of the same batches, sharded as it is put on the 8 devices, equals 1 device
    assert out["stream_max_abs_diff"] < 1e-5, out["stream_max_abs_diff"]


def test_two_processes_train_in_lockstep_like_one_process(tmp_path):
    port = _free_port()
    driver = str(ROOT / "tests" / "mp_driver.py")
    procs = [
        subprocess.Popen(
            [sys.executable, driver, str(i), "2", str(port), str(tmp_path / f"p{i}.npz")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["process"] for o in outs] == [0, 1] and all(o["processes"] == 2 for o in outs)
    assert outs[0]["val_loss"] == outs[1]["val_loss"]  # lockstep: the same replicated state
    from mp_driver import train  # tests/ is on the path: the reference runs in this process

    got, (want, _) = np.load(tmp_path / "p0.npz"), train(0, num_processes=0)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_accumulate_equals_the_larger_batch(tiny_data, adam):
    x, y = tiny_data.x_train, tiny_data.y_train
    model = build_model("mlp(features=(16,))", 4)
    a = create_train_state(model, adam, x, jax.random.key(0))
    a, ha = fit(a, (x, y), batch_size=10, accumulate=4, steps=10, data_key=jax.random.key(1))
    b = create_train_state(model, adam, x, jax.random.key(0))
    b, hb = fit(b, (x, y), batch_size=40, steps=10, data_key=jax.random.key(1))
    for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    assert int(a.step) == 10 and ha.records[-1]["train_loss"] == pytest.approx(
        hb.records[-1]["train_loss"], rel=1e-5
    )


def test_accumulate_with_batchnorm_normalises_each_micro_batch_in_turn(tiny_data):
    """With BatchNorm an accumulated step is not the larger batch's: by hand, each
    micro-batch is normalised by its own statistics, which carry to the next, and the
    update is the optimizer's on the summed gradients (each micro-batch's loss over 40).
    SGD, as Adam would blow the float noise of the bias before BatchNorm (gradient 0) up."""
    model = build_model("mlp(features=(8,), norm='batch')", 4)
    sgd = optax.sgd(0.5)
    x, y = jnp.asarray(tiny_data.x_train[:40]), jnp.asarray(tiny_data.y_train[:40])
    state = create_train_state(model, sgd, x, jax.random.key(0))

    def loss(params, stats, xb, yb):
        out, new = model.apply(
            {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(out, yb).sum() / 40, new

    grads, stats = [], state.batch_stats
    for i in range(2):
        g, new = jax.grad(loss, has_aux=True)(
            state.params, stats, x[20 * i :][:20], y[20 * i :][:20]
        )
        grads, stats = [*grads, g], new["batch_stats"]
    updates, _ = sgd.update(jax.tree.map(jnp.add, *grads), state.opt_state, state.params)
    want = optax.apply_updates(state.params, updates)
    got, _ = jax.jit(make_train_step(accumulate=2))(state, (x, y))
    whole, _ = jax.jit(make_train_step())(state, (x, y))
    for a, b in ((got.params, want), (got.batch_stats, stats)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b)
    gap = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), got.params, whole.params)
    assert max(jax.tree.leaves(gap)) > 1e-4  # the larger batch normalises over all 40


def test_bf16_trains_with_float32_master_parameters(tiny_data, adam):
    x, y = tiny_data.x_train, tiny_data.y_train
    model = build_model("cnn(channels=(4, 4, 4), norm='batch')", 4)
    state = create_train_state(model, adam, x, jax.random.key(0))
    step = make_train_step(precision="bf16")
    jaxpr = str(jax.make_jaxpr(step)(state, (jnp.asarray(x[:20]), jnp.asarray(y[:20]))))
    assert "bf16" in jaxpr  # the forward/backward really runs in bfloat16
    state, hist = fit(state, (x, y), batch_size=20, epochs=5, precision="bf16")
    losses = hist["train_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    for tree in (state.params, state.batch_stats):
        assert {a.dtype for a in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    floats = [a for a in jax.tree.leaves(state.opt_state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float32 for a in floats)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--accumulate", "0"], "--accumulate"),
        (["--precision", "fp8"], "--precision"),
        (["--coordinator", "localhost:1234"], "--coordinator"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "--coordinator"),
        (
            ["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id",
        ),
        (["--batch-size", "150", "--accumulate", "2"], "--batch-size"),
        (["--mesh", "data=3"], "argument --mesh: mesh 'data=3': the axis sizes must multiply"),
        (["--mesh", "tensor=1"], "argument --mesh: mesh must be AXIS=SIZE"),
    ],
)
def test_cli_bad_parallel_inputs_exit_2(tmp_path, capsys, extra, needle):
    from jtricks.cli import main

    out = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        "synthetic(num_train=200, num_test=40, shape=(16,), num_classes=4)",
    ]
    assert main([*args, "--model", "mlp", "--steps", "2", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_optax_sgd_is_unchanged_by_the_mesh_option(tiny_data):
    """mesh=None and the default ("auto" on one device) are the same program."""
    x, y = tiny_data.x_train, tiny_data.y_train
    model = build_model("mlp(features=(8,))", 4)
    tx = optax.sgd(0.1)
    a, _ = fit(create_train_state(model, tx, x, jax.random.key(0)), (x, y), batch_size=20, steps=5)
    b, _ = fit(
        create_train_state(model, tx, x, jax.random.key(0)),
        (x, y),
        batch_size=20,
        steps=5,
        mesh=None,
    )
    for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(p, q)


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}  # fmt: skip


@pytest.mark.parametrize(
    ("environ", "found"),
    [
        (SLURM, ("SLURM", 4, 2)),
        ({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # one task: no cluster
        ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # sbatch, no srun
        ({**SLURM, "JTRICKS_AUTO_DISTRIBUTED": "0"}, None),
        (
            {
                "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:34911",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_RANK": "1",
            },
            ("Open MPI", 2, 1),
        ),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),  # a pod, not an indexed Job
        ({}, None),
    ],
)
def test_the_launchers_environment_is_read(environ, found):
    from jtricks.training.processes import detect_cluster

    assert detect_cluster(environ) == found


def test_cli_start_up_calls_initialize_without_arguments_under_slurm(monkeypatch, capsys):
    import argparse

    from jtricks.cli.train import start_processes

    calls = []
    monkeypatch.setenv("JTRICKS_FATAL_FILTER", "0")  # not in the test worker
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    start_processes(argparse.Namespace(coordinator=None, num_processes=None, process_id=None))
    assert calls == [
        ("jax_cpu_collectives_implementation", "gloo"),
        ((), {"heartbeat_timeout_seconds": 90}),
    ]
    assert "SLURM started this process (process 2 of 4)" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_NTASKS", "1")
    calls.clear()
    start_processes(argparse.Namespace(coordinator=None, num_processes=None, process_id=None))
    assert calls == []


def test_fsdp_on_eight_simulated_devices_matches_one_device_and_shards_by_the_rule():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_driver.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for name, case in out["cases"].items():
        # parameters, optimizer state and BatchNorm statistics lie where the rule says
        assert case["follows_rule"] and case["sharded_leaves"] >= 2, name
        tol = 1e-5 if name.startswith("adam") else 1e-6  # SGD: float reassociation only
        assert case["max_abs_diff"] < tol and case["stats_diff"] < 1e-6, (name, case)
        assert case["val_loss"][1] == pytest.approx(case["val_loss"][0], rel=1e-5)
    assert out["stream_max_abs_diff"] < 1e-5
    # memory: each device holds 1/8 of the parameters and Adam's two moments, but for the
    # leaves too small to shard
    whole = out["bytes_kept_whole"]
    assert out["bytes_sharded"] <= (out["bytes_replicated"] - whole) / 8 + whole, out
    assert out["bytes_sharded"] <= 0.15 * out["bytes_replicated"], out
    cli = out["cli"]  # the CLI's --mesh, and its checkpoint restored onto one device
    assert cli["checkpoint"] == "epoch-000003" and cli["restored_diff"] == 0.0
    assert cli["restored_devices"] == 1
    assert cli["four_diff"] == 0.0 and cli["four_devices"] == [4] and cli["four_follows_rule"]
    assert cli["test_loss"][0] == pytest.approx(cli["test_loss"][1], rel=1e-4)


MP_ARGS = [
    "--dataset",
    "synthetic(num_train=200, num_test=40, shape=(16,), num_classes=4, noise=2.0)",
]
MP_ARGS += ["--model", "mlp(features=(16,), dropout=0.2)", "--epochs", "6", "--batch-size", "20"]
MP_ARGS += ["--checkpoint-every", "2", "--no-progress"]


def _two_processes(
    tmp_path, out, *, fault=None, faulty=(0, 1), resume=False, extra=(), base=MP_ARGS
):
    """Both processes of a localhost run of ``base`` + ``extra`` arguments, or of
    ``--resume out`` + ``extra`` (``fault``:
    fault_driver's MODE and EPOCH, in the ``faulty`` processes); ``(returncode, stdout,
    stderr, seconds)`` of each."""
    port = _free_port()
    args = ["--resume", str(out), *extra] if resume else [*base, *extra, "--out", str(out)]
    faulted = [str(ROOT / "tests" / "fault_driver.py"), *(fault or ()), "--"]
    heads = [faulted if fault and i in faulty else ["-m", "jtricks.cli", "train"] for i in (0, 1)]
    multi = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen(
            [sys.executable, *heads[i], *args, *multi, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    started, results = time.monotonic(), []
    for p in procs:
        out_err = p.communicate(timeout=300)
        results.append((p.returncode, *out_err, time.monotonic() - started))
    return results


CHUNK = ("--chunk", "4")  # 9 steps an epoch, in parts of 3


@pytest.fixture(scope="module")
def mp_reference(tmp_path_factory):
    """One uninterrupted two-process run, epochs in parts: what the killed and the stopped
    runs below must end equal to (parts change where the host looks, not the numbers)."""
    root = tmp_path_factory.mktemp("mp")
    lines = []
    for code, stdout, stderr, _ in _two_processes(root, root / "ref", extra=CHUNK):
        assert code == 0, stderr[-3000:]
        lines.append(next(ln for ln in stdout.splitlines() if ln.startswith("test_loss")))
    assert lines[0].split("wall")[0] == lines[1].split("wall")[0]  # both print the run's metrics
    assert json.loads((root / "ref" / "summary.json").read_text())["steps"] == 6 * 9
    return root / "ref"


def test_two_processes_checkpoint_and_resume_bit_identically(tmp_path, mp_reference):
    from jtricks.training.checkpoint import list_checkpoints, restore

    ref = mp_reference
    # the epochs' and best/'s background writers both wrote epoch 6 at once (their
    # barriers across the processes must not meet)
    assert [p.name for p in list_checkpoints(ref / "checkpoints" / "best")] == ["epoch-000006"]
    out = tmp_path / "run"
    # process 1 dies (SIGKILL) in epoch 6, dispatched before epoch 5's record is read (the
    # loop runs ahead of its callbacks), so after epoch 4's checkpoint began; process 0
    # stops with one line: at once when it is in a collective (gloo sees the closed
    # connection: the training program's or a checkpoint write's), else within the bound
    # (`watch_peers`: here it waits for a checkpoint's barrier)
    (code0, _, err0, _), (code1, *_) = _two_processes(
        tmp_path, out, fault=("epoch", "6"), faulty=(1,), extra=("--distributed-timeout", "5")
    )
    assert code1 == -signal.SIGKILL and code0 == 1, err0[-3000:]
    assert len(err0.strip().splitlines()) == 1, err0[-3000:]
    assert "stopped" in err0 and "--resume RUN_DIR" in err0
    assert not (out / "summary.json").exists()
    # written in the background: epoch 4's may still have been in flight (epoch 2's was
    # done: a save waits for the one before)
    newest = [p.name for p in list_checkpoints(out / "checkpoints")][-1]
    assert newest in ("epoch-000002", "epoch-000004")
    alone = tmp_path / "alone"  # the same folder resumed by one process: resharded, said so
    shutil.copytree(out, alone)
    proc = subprocess.run(
        [sys.executable, "-m", "jtricks.cli", "train", "--resume", str(alone), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was saved from 2 device(s) in 2 process(es); restored onto 1" in proc.stderr
    for code, _, stderr, _ in _two_processes(tmp_path, out, resume=True):
        assert code == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # both checkpoints restore in one process (this one, one device), bit-identical
    a, meta_a = restore(ref / "checkpoints", _template())
    b, meta_b = restore(out / "checkpoints", _template())
    assert meta_a["epoch"] == meta_b["epoch"] == 6 and int(a.step) == int(b.step) == meta_a["step"]
    left, right = jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))
    for x, y in zip(left, right, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_processes_stop_together_on_sigterm_and_resume_bit_identically(tmp_path, mp_reference):
    from jtricks.training.checkpoint import list_checkpoints

    ref, out = mp_reference, tmp_path / "run"
    # process 1 alone gets SIGTERM after its 5th part
    results = _two_processes(tmp_path, out, fault=("term", "5"), extra=CHUNK)
    assert [r[0] for r in results] == [143, 143], [r[2][-2000:] for r in results]
    assert all("interrupted by" in r[2] for r in results)
    assert [p.name for p in list_checkpoints(out / "checkpoints" / "interrupted")] == [
        "epoch-000002"
    ]
    for code, _, stderr, _ in _two_processes(tmp_path, out, resume=True):
        assert code == 0, stderr[-3000:]
    for a, b in zip(_final_arrays(ref), _final_arrays(out), strict=True):
        np.testing.assert_array_equal(a, b)
    # epoch 2, cut by the stop, averages its steps before and after it (partial_epoch)
    rows = [[json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (ref, out)]  # fmt: skip
    for name in ("train_loss", "train_accuracy", "val_loss"):
        np.testing.assert_allclose(*[[r[name] for r in rs] for rs in rows], rtol=1e-5)


@functools.cache
def _template():
    """A state of the two-process runs' shape, on this process's one device."""
    import jtricks

    return jtricks.train(**{**_settings(MP_ARGS), "epochs": 1}).state


def _final_arrays(run):
    from jtricks.training.checkpoint import restore

    state, meta = restore(run / "checkpoints", _template())
    assert meta["epoch"] == 6
    return [np.asarray(a) for a in jax.tree.leaves((state.params, state.opt_state, state.step))]


def _settings(args):
    """``TrainConfig`` keywords from CLI arguments of the form ``--name value``."""
    out, it = {}, iter(args)
    for flag in it:
        if flag == "--no-progress":
            continue
        value = next(it)
        out[flag[2:].replace("-", "_")] = int(value) if value.isdigit() else value
    return out


def test_the_two_process_checkpoint_benchmark_runs_and_both_arms_agree():
    """`benchmarks/bench_mp_checkpoint.py`, tiny: both arms (saves in step and in the
    background) finish and end with the same parameters."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mp_checkpoint.py"), "--repeats", "1",
         "--epochs", "2", "--steps", "2", "--batch-size", "8", "--inputs", "4", "--width", "8"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[0])
    assert out["same_parameters"] is True and out["params"] == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10


def _on_disk(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 40)):
        y = rng.integers(0, 3, n).astype(np.int64)
        x = (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32)
        write_shards(root / split, {"x": x, "y": y}, shard_size=50)
    return f"shards:{root}"


@pytest.mark.parametrize("source", ["shards", "stream"])
def test_two_processes_stream_their_blocks_of_every_batch_like_one_process(tmp_path, source):
    """A dataset on disk (or ``--stream``) with two processes: each reads only its block
    of every batch (`EpochBatches(process=...)`), so the run trains on the batches one
    process reads: equal to the one-process run up to float reassociation."""
    from jtricks.training.checkpoint import restore_latest

    dataset = _on_disk(tmp_path / "ds") if source == "shards" else MP_ARGS[1]
    args = ["--dataset", dataset, "--model", "mlp(features=(16,), dropout=0.2)"]
    args += ["--batch-size", "20", "--epochs", "3", "--chunk", "3", "--no-progress"]
    args += ["--stream"] if source == "stream" else []
    one = subprocess.run(
        [sys.executable, "-m", "jtricks.cli", "train", *args, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for code, _, stderr, _ in _two_processes(tmp_path, tmp_path / "two", base=args):
        assert code == 0, stderr[-3000:]
    rows = [[json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]  # fmt: skip
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]
    for name in ("train_loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(*[[r[name] for r in rs] for rs in rows], rtol=2e-5)
    import jtricks

    template = jtricks.train(dataset=dataset, model="mlp(features=(16,), dropout=0.2)",
                             batch_size=20, epochs=1).state  # fmt: skip
    a, b = (restore_latest(tmp_path / run / "checkpoints", template)[0] for run in ("one", "two"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
    if source == "stream":
        return
    # both processes killed at their 5th chunk (epoch 2), resumed: bit-identical
    killed = tmp_path / "killed"
    for code, _, stderr, _ in _two_processes(tmp_path, killed, base=args, fault=("chunk", "5")):
        assert code == -signal.SIGKILL, stderr[-3000:]
    for code, _, stderr, _ in _two_processes(tmp_path, killed, resume=True):
        assert code == 0, stderr[-3000:]
    c = restore_latest(killed / "checkpoints", template)[0]
    left, right = ((s.params, s.opt_state, s.step) for s in (b, c))
    for x, y in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
