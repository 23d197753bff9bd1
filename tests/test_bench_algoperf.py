"""Protocol v2 of `jtricks bench`: algorithms from a trial's hyper-parameters, workloads
scored by their task, the runner's bookkeeping against a recomputation from its own
trials, the target files, and the CLI's refusals."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtricks.bench.algoperf import run_algoperf
from jtricks.bench.algorithms import ALGORITHMS, DEFAULT_HPARAMS, build_algorithm
from jtricks.bench.targets import SCHEMA, check_targets, load_targets
from jtricks.bench.workloads import select
from jtricks.cli import main
from jtricks.errors import ConfigError

HP = {"learning_rate": 0.1, "one_minus_b1": 0.1, "weight_decay": 0.01, "warmup_fraction": 0.25}


@pytest.fixture(scope="module")
def tiny_workload():
    """The quick suite's regression, cut to 100 steps evaluated every 50."""
    (w,) = select("quick", ["regression_mlp"])
    return replace(w, total_steps=100, eval_period=50, max_runtime=60.0)


def test_every_algorithm_runs_with_traced_hyper_parameters():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.1])}

    @jax.jit
    def two_steps(hp):
        out = {}
        for name in ALGORITHMS:
            tx = build_algorithm(name, hp, 20)
            p, s = params, tx.init(params)
            for _ in range(2):
                u, s = tx.update(jax.tree.map(lambda x: 2 * x, p), s, p)
                p = jax.tree.map(jnp.add, p, u)
            out[name] = p
        return out

    hp = {k: jnp.float32(v) for k, v in HP.items()}
    for name, p in two_steps(hp).items():
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(p)), name
        assert not np.allclose(p["w"], params["w"]), name  # the second step moves (lr > 0)


def test_heavy_ball_is_the_formula_by_hand():
    """``v = b1 v + g + wd w``, ``w -= eta_t v`` with the warm-up/cosine ``eta_t``."""
    total, warm = 8, 2
    tx = build_algorithm("heavy_ball", HP, total)
    w = np.array([1.0, -2.0])
    v = np.zeros(2)
    params, state = jnp.asarray(w, jnp.float32), tx.init(jnp.asarray(w, jnp.float32))
    for t in range(total):
        g = 2 * w
        eta = (
            0.1 * t / warm
            if t <= warm
            else 0.05 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
        )
        v = 0.9 * v + g + 0.01 * w
        w = w - eta * v
        u, state = tx.update(2 * params, state, params)
        params = params + u
        np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)


def test_a_workload_scores_with_its_task_metric(tiny_workload):
    inst = tiny_workload.build()
    params = inst.init(jax.random.key(0))
    val, test = inst.evaluate(params)
    # second code path: the mean squared error of the model's predictions, in NumPy
    from jtricks.data import Scaler, load_dataset
    from jtricks.nn import build_model

    data = load_dataset(tiny_workload.dataset)
    from jtricks.data import train_val_split

    x_tr, _, _, _ = train_val_split(data.x_train, data.y_train, 0.1, seed=0, stratify=False)
    x = Scaler.fit("standardize", x_tr)(data.x_test)
    model = build_model(tiny_workload.model, data.num_classes)
    pred = np.asarray(model.apply({"params": params}, jnp.asarray(x)), np.float64)
    want = np.mean((pred.reshape(data.y_test.shape) - data.y_test) ** 2)
    np.testing.assert_allclose(float(test), want, rtol=1e-4)
    assert np.isfinite(val) and float(val) > 0


def test_a_trials_chunk_is_the_plain_optax_loop(tiny_workload):
    """A trial's chunk (`fit`'s part program over `bench_step`) against the loop an
    AlgoPerf submission writes: ``value_and_grad`` of the workload's loss at step t,
    ``tx.update``, ``optax.apply_updates``, for one evaluation period."""
    import optax

    from jtricks.bench.trials import as_hparams, compile_program

    inst, w = tiny_workload.build(), tiny_workload
    program = compile_program(w, inst, "adamw", w.total_steps)
    hp, key = as_hparams(HP), jax.random.key(3)
    state = program.chunk(program.chunk(program.init(key, hp)))
    tx = build_algorithm("adamw", hp, w.total_steps)

    @jax.jit
    def step(params, opt_state, t):
        grads = jax.grad(inst.loss)(params, key, t, hp["label_smoothing"])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = inst.init(key)
    opt_state = tx.init(params)
    for t in range(2 * w.eval_period):
        params, opt_state = step(params, opt_state, jnp.int32(t))
    assert int(state.step) == 2 * w.eval_period
    # float32 sums in another order (a scan vs one call per step): 3e-6 after 100 steps
    chex.assert_trees_all_close(state.params, params, rtol=2e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tiny_workload):
    targets = {tiny_workload.name: {"metric": "mse", "validation": 0.05, "test": 0.05}}
    return run_algoperf(
        [tiny_workload], targets, algorithms=["nadamw", "adamw"], num_trials=2, num_studies=2
    )


def test_the_runner_scores_its_own_trials_as_the_rules_say(tiny_run):
    trials = tiny_run["trials"]
    assert len(trials) == 2 * 2 * 2  # algorithms x studies x trials
    assert len({(t["algorithm"], t["seed"]) for t in trials}) == 8
    assert len({t["seed"] for t in trials}) == 4  # both algorithms see the same trials
    for t in trials:
        if math.isfinite(t["time_to_target"]):  # compilation counted, evaluation not
            assert t["time_to_target"] == pytest.approx(t["compile_s"] + t["train_s"])
            assert t["curve"][-1]["metric"] <= 0.05
    for alg in ("nadamw", "adamw"):
        per_study = [
            min(t["time_to_target"] for t in trials if t["algorithm"] == alg and t["study"] == s)
            for s in (0, 1)
        ]
        want = math.inf if math.isinf(max(per_study)) else statistics.mean(per_study)
        assert tiny_run["workload_times"]["regression_mlp"][alg] == want
    assert set(tiny_run["scores"]) >= {"ratios", "profile", "score", "speedup_vs_baseline"}


def test_self_tuning_runs_the_defaults_once_per_study_with_half_again_the_budget(tiny_workload):
    targets = {tiny_workload.name: {"metric": "mse", "validation": 0.0, "test": 0.0}}
    res = run_algoperf(
        [tiny_workload], targets, ruleset="self-tuning", algorithms=["adamw"], num_studies=2
    )
    assert len(res["trials"]) == 2 and res["protocol"]["trials"] == 1
    for t in res["trials"]:
        assert t["hparams"] == pytest.approx(DEFAULT_HPARAMS)
        assert t["curve"][-1]["step"] == 150 and math.isinf(t["time_to_target"])


def test_target_files_are_checked():
    workloads = select("quick", ["regression_mlp"])
    good = {
        "schema": SCHEMA,
        "workloads": {"regression_mlp": {"metric": "mse", "validation": 0.1, "test": 0.1}},
    }
    assert check_targets(good, workloads, "f")["regression_mlp"]["test"] == 0.1
    bad = [
        ({"schema": "x"}, "schema must be"),
        ({"schema": SCHEMA, "workloads": {}}, "no targets for workload 'regression_mlp'"),
        (
            {
                "schema": SCHEMA,
                "workloads": {"regression_mlp": {"metric": "mse", "validation": "a", "test": 1}},
            },
            "'validation' must be a finite number",
        ),
        (
            {
                "schema": SCHEMA,
                "workloads": {"regression_mlp": {"metric": "accuracy", "validation": 1, "test": 1}},
            },
            "judged on 'mse'",
        ),
    ]
    for obj, match in bad:
        with pytest.raises(ConfigError, match=match):
            check_targets(obj, workloads, "f")


@pytest.mark.parametrize("suite", ["quick", "full"])
def test_each_suite_ships_its_targets(suite):
    workloads = select(suite)
    targets = load_targets(None, suite, workloads)
    assert set(targets) == {w.name for w in workloads}
    assert all(
        t["set_by"]["algorithm"] in ("adamw", "nadamw", "heavy_ball", "nesterov")
        for t in targets.values()
    )


def test_cli_writes_the_results_and_compares_them(tmp_path, capsys):
    targets = tmp_path / "targets.json"
    entry = {"metric": "mse", "validation": 0.05, "test": 0.05}
    targets.write_text(json.dumps({"schema": SCHEMA, "workloads": {"regression_mlp": entry}}))
    out = tmp_path / "run"
    algorithms = "nadamw,sgd | lookahead(sync_period=2)"  # a pipeline's | in the tables
    argv = ["bench", "--workloads", "regression_mlp", "--algorithms", algorithms, "--trials"]
    argv += ["1", "--studies", "1", "--targets", str(targets), "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    for name in ("results.json", "results.md", "profile.png", "speedup.png", "lr_sensitivity.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "jtricks.bench/2" and len(results["trials"]) == 2
    for table in (out / "results.md").read_text().split("\n\n"):
        rows = [r.replace("\\|", "") for r in table.splitlines() if r.startswith("|")]
        assert len({r.count("|") for r in rows}) <= 1, table  # every row as many cells
    capsys.readouterr()
    assert main(["bench", "compare", str(out / "results.json"), str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "regression_mlp | nadamw" in printed
    assert "regression_mlp | sgd \\| lookahead(sync_period=2) |" in printed


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--ruleset", "open"], "unknown ruleset 'open'"),
        (["--workloads", "imagenet"], "unknown workload 'imagenet'"),
        (["--algorithms", "adamz"], "unknown algorithm 'adamz'"),
        (["--search-space", "{space}"], "the range [0.1, 0.001] is empty or inverted"),
        (["--targets", "{wrong}"], "schema must be 'jtricks.bench.targets/1'"),
        (["--trials", "0"], "--trials must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, needle):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"low": 0.1, "high": 0.001}}))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "jtricks.bench/1", "workloads": {}}))
    out = tmp_path / "run"
    argv = [a.format(space=space, wrong=wrong) for a in extra]
    assert main(["bench", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_each_algorithm_tunes_in_its_own_space_on_the_same_points_and_seeds():
    from jtricks.bench.algoperf import plan
    from jtricks.bench.algorithms import defaults_for
    from jtricks.bench.search import DEFAULT_SPACE, space_for

    adam = plan("external", space_for("nadamw"), 5, 3, 7)
    lion = plan("external", space_for("lion"), 5, 3, 7)
    assert space_for("nadamw") == DEFAULT_SPACE
    flat = [[t for study in p for t in study] for p in (adam, lion)]
    for a, b in zip(*flat, strict=True):
        assert a["seed"] == b["seed"]
        assert a["point"]["one_minus_b1"] == b["point"]["one_minus_b1"]
        # the same unit point, mapped log-uniformly onto each range
        u_adam = math.log(a["point"]["learning_rate"] / 1e-4) / math.log(3e-2 / 1e-4)
        u_lion = math.log(b["point"]["learning_rate"] / 1e-5) / math.log(3e-3 / 1e-5)
        assert u_adam == pytest.approx(u_lion) and 1e-5 <= b["point"]["learning_rate"] <= 3e-3
    (study,) = plan("self-tuning", space_for("lion"), 5, 1, 7, defaults_for("lion"))
    assert study[0]["point"]["learning_rate"] == 1e-4 and len(study) == 1


def _fake_cifar(folder, n):
    """CIFAR-10's python batches (pickled dicts of uint8 rows), a few images each."""
    import pickle

    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {
            b"labels": list(rng.integers(0, 10, n)),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_data_dir_adds_cifar10_which_needs_its_own_targets(tmp_path, capsys):
    _fake_cifar(tmp_path, 20)
    (cifar,) = select("quick", ["cifar10_resnet20"], str(tmp_path))
    assert cifar.dataset == f"cifar10:{tmp_path}" and cifar.metric == "accuracy"
    assert "cifar10_resnet20" not in {w.name for w in select("quick")}
    out = tmp_path / "run"
    argv = ["bench", "--data-dir", str(tmp_path), "--workloads", "cifar10_resnet20"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no targets for workload 'cifar10_resnet20'" in err and "jtricks bench targets" in err
    assert not out.exists()


def test_the_targets_command_writes_a_file_the_runner_accepts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "targets.json"
    argv = ["bench", "targets", "--workloads", "regression_mlp", "--trials", "1"]
    assert main([*argv, "--reruns", "1", "--no-progress", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["trials"] == 1 and written["reruns"] == 1 and written["suite"] == "quick"
    (w,) = select("quick", ["regression_mlp"])
    entry = check_targets(written, [w], str(out))["regression_mlp"]
    assert entry["set_by"]["algorithm"] in ("adamw", "nadamw", "heavy_ball", "nesterov")
    assert 0 < entry["validation"] < 1  # an MSE (the noise variance of the data is 0.01)
    capsys.readouterr()
    assert main(["bench", "targets", "--workloads", "regression_mlp"]) == 2
    assert "bench targets needs --out FILE.json" in capsys.readouterr().err
    # a folder, or a file that cannot be written, is refused before the tuning (not after)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setattr("jtricks.bench.targets.set_targets", lambda *a, **k: 1 / 0)  # never
    for bad, words in ((tmp_path, "is a folder"), (blocked / "t.json", "cannot write")):
        assert main([*argv, "--no-progress", "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
