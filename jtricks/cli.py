"""The ``jtricks`` command.

User errors (bad names, numbers, files, data) print one ``jtricks: error: ...``
line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jtricks.errors import ConfigError, StreamError, WriteError
from jtricks.spec import split_top_level

# config field -> CLI flag, to point errors at what the user typed
FLAGS = {
    "recipe": "--recipe",
    "dataset": "--dataset",
    "task": "--task",
    "model": "--model",
    "optimizer": "--optimizer",
    "learning_rate": "--lr",
    "schedule": "--schedule",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "steps": "--steps",
    "val_fraction": "--val-fraction",
    "preprocess": "--preprocess",
    "seed": "--seed",
    "eval_batch_size": "--eval-batch-size",
    "out": "--out",
    "resume": "--resume",
    "early_stopping": "--early-stopping",
    "checkpoint_every": "--checkpoint-every",
    "keep_checkpoints": "--keep-checkpoints",
    "max_nonfinite": "--max-nonfinite",
    "augment": "--augment",
    "mixup": "--mixup",
    "cutmix": "--cutmix",
    "label_smoothing": "--label-smoothing",
    "tta": "--tta",
    "tta_augment": "--tta-augment",
    "ema": "--ema",
    "eval_params": "--eval-params",
    "accumulate": "--accumulate",
    "coordinator": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
    "precision": "--precision",
    "fused": "--fused",
    "stream": "--stream",
    "loader": "--loader",
    "chunk": "--chunk",
    "swa": "--swa",
    "ensemble": "--ensemble",
    "pretrained": "--pretrained",
    "finetune": "--finetune",
    "overfit_steps": "--overfit-steps",
    "signal_steps": "--signal-steps",
    "lr_min": "--lr-min",
    "lr_max": "--lr-max",
    "num": "--lr-num",
    "lr_steps": "--lr-steps",
    "lr_num": "--lr-num",
    "suite": "--suite",
    "problems": "--problems",
    "optimizers": "--optimizers",
    "seeds": "--seeds",
}


class QuietThreadTracebacks:
    """``sys.stderr`` for the CLI, dropping whole tracebacks that other threads print and
    that end in ``RuntimeError: Event loop is closed``: tensorstore callbacks reaching an
    event loop orbax already closed after a failed checkpoint write (the failure itself
    is reported as one line). Everything else passes through unchanged."""

    NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream) -> None:
        self._stream = stream
        self._held: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        import threading

        ident = threading.get_ident()
        if ident == threading.main_thread().ident:
            return self._stream.write(text)
        held = self._held.get(ident)
        if held is None and not text.startswith("Traceback (most recent call last)"):
            return self._stream.write(text)
        held = self._held.setdefault(ident, [])
        held.append(text)
        block = "".join(held)
        last = block.rstrip("\n").rsplit("\n", 1)[-1]
        if block.endswith("\n") and last and not last.startswith((" ", "Traceback")):
            del self._held[ident]  # the traceback's final line: drop noise, print the rest
            if last != self.NOISE:
                self._stream.write(block)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jtricks train: error: argument --lr: ...`` and a
    pointer to ``--help`` instead of the whole usage (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    from jtricks import __version__

    parser = _Parser(prog="jtricks", description="JAX deep-learning training tricks.")
    parser.add_argument("--version", action="version", version=f"jtricks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model and write a run folder",
        description="Train a model; writes config.json, metrics.jsonl, curves.png and summary.json to --out.",
    )
    t.add_argument(
        "--recipe",
        default=None,
        help="start from a named setting (tricks: BatchNorm + AdamW + one-cycle + shift "
        "augmentation on the paper CNN; tricks_wide: the same on a wider residual CNN); "
        "flags you give override it",
    )
    t.add_argument(
        "--dataset",
        default="mnist1d",
        help="dataset spec: mnist1d, synthetic(shape=(8, 8, 3), ...), regression, "
        "segmentation1d, tokens, text:PATH, npz:PATH, shards:DIR (.npy shards on disk, "
        "streamed), ...",
    )
    t.add_argument(
        "--task",
        default=None,
        help="task spec (default: the dataset's own): classification, multilabel, regression, "
        "segmentation(dice_weight=1.0), lm(pad_id=0)",
    )
    t.add_argument(
        "--model", default="cnn", help="model spec: cnn, mlp, mlp(features=(256, 256), dropout=0.2)"
    )
    t.add_argument(
        "--optimizer",
        default="adam",
        help="optimizer spec: sgd, momentum, adam, adamw, rmsprop, ...",
    )
    t.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=1e-2,
        help="learning rate",
    )
    t.add_argument(
        "--schedule",
        default="constant",
        help="learning-rate schedule (durations in epochs): constant, per_epoch(factor=0.98), exponential(rate=0.05), "
        "step(epochs=(30, 60), factor=0.1), warmup(epochs=1), warmup_cosine(warmup_epochs=1), cosine, one_cycle, "
        "plateau(factor=0.5, patience=5)",
    )
    t.add_argument("--batch-size", type=int, default=100)
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="number of epochs")
    length.add_argument(
        "--steps",
        type=int,
        default=None,
        help="number of optimizer steps (default 6000, the paper's)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of training data held out, in (0, 1)",
    )
    t.add_argument(
        "--no-stratify", dest="stratify", action="store_false", help="plain random validation split"
    )
    t.add_argument(
        "--preprocess", default="standardize", help="standardize, minmax, minmax(-1, 1) or none"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-batch-size", type=int, default=1000)
    t.add_argument(
        "--out", default=None, help="run folder (default runs/train-<time>); must be new or empty"
    )
    t.add_argument(
        "--early-stopping",
        type=int,
        default=None,
        metavar="PATIENCE",
        help="stop when the validation loss has not improved for PATIENCE epochs; keep the best",
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="checkpoint every N epochs (and at the end)",
    )
    t.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="keep the last K checkpoints (plus the best)",
    )
    t.add_argument(
        "--max-nonfinite",
        type=int,
        default=20,
        help="stop after N consecutive steps with a NaN/inf loss or gradient (each is skipped)",
    )
    t.add_argument(
        "--augment",
        default=None,
        help='training-only augmentation pipeline, e.g. "shift(3) | noise(0.05)" or '
        '"random_crop(4) | hflip"; names: hflip, translate, random_crop, rotate, cutout, '
        "brightness, contrast, noise, scale, shift, time_stretch, trend",
    )
    mixing = t.add_mutually_exclusive_group()
    mixing.add_argument(
        "--mixup", type=float, default=None, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA)"
    )
    mixing.add_argument(
        "--cutmix", type=float, default=None, metavar="ALPHA", help="cutmix with Beta(ALPHA, ALPHA)"
    )
    t.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="S",
        help="train on targets (1 - S) * one_hot + S / C (default 0: off)",
    )
    t.add_argument(
        "--tta",
        type=int,
        default=1,
        metavar="V",
        help="test-time augmentation: report final validation/test metrics of the mean "
        "softmax over V views (the clean input and V-1 augmented ones; default 1: off)",
    )
    t.add_argument(
        "--tta-augment",
        default=None,
        metavar="SPEC",
        help="augmentation pipeline for the --tta views (default: --augment)",
    )
    t.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="gradient accumulation: K micro-batches of --batch-size per optimizer update",
    )
    t.add_argument(
        "--precision",
        default="float32",
        choices=None,
        help="float32, or bf16 (compute in bfloat16; float32 master parameters and optimizer state)",
    )
    t.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process training: the address of process 0 (calls jax.distributed.initialize)",
    )
    t.add_argument("--num-processes", type=int, default=None, help="with --coordinator")
    t.add_argument("--process-id", type=int, default=None, help="with --coordinator: 0 .. N-1")
    t.add_argument(
        "--fused",
        action="store_true",
        default=False,
        help="fused optimizer: the update runs over one flat buffer per dtype group "
        "(jtricks.optim.fused), so its cost does not grow with the number of parameter arrays",
    )
    t.add_argument(
        "--stream",
        action="store_true",
        default=False,
        help="train from a stream of host batches fed to the device ahead of use, as for a "
        "dataset on disk (shards:DIR always streams); the batches are the in-memory path's",
    )
    t.add_argument(
        "--loader",
        default="python",
        metavar="NAME",
        help="who reads a stream's batches: python (a background thread) or grain "
        "(Grain's threaded reader; pip install 'jtricks[grain]')",
    )
    t.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="K",
        help="a stream's steps per compiled program (default: up to 64 batches or 64 MiB)",
    )
    t.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the parameters (e.g. 0.999); "
        "validation and test are also reported on it",
    )
    t.add_argument(
        "--eval-params",
        default="auto",
        metavar="SOURCE",
        help="the parameters validation, test, early stopping, the best checkpoint and TTA use: "
        "auto (the optimizer's evaluation parameters where it declares them, e.g. "
        "schedule-free, else the training ones), train, or ema (needs --ema)",
    )
    t.add_argument(
        "--swa",
        type=int,
        default=None,
        metavar="EPOCH",
        help="stochastic weight averaging from EPOCH on; BatchNorm re-estimated at the end",
    )
    t.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="train N models at once (one vmapped program); reports each member and the ensemble",
    )
    t.add_argument(
        "--pretrained",
        default=None,
        metavar="DIR",
        help="load matching parameters from a run folder or checkpoint folder",
    )
    t.add_argument(
        "--finetune",
        default=None,
        metavar="PRESET",
        help="with --pretrained: head (train the last layer), last:K (the last K layers) or all",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest intact checkpoint, with its own config",
    )
    t.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="print a line every N epochs (and the first and last)",
    )
    t.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar or epoch lines",
    )

    d = sub.add_parser(
        "diagnose",
        help="run the diagnostic checks on a model and dataset",
        description="Initial loss, gradient check, overfit one batch, signal propagation and the "
        "LR finder; prints a verdict table and writes diagnose.json and plots to --out. "
        "Exit status 1 when a check fails.",
    )
    d.add_argument("--dataset", default="mnist1d", help="dataset spec (training split only)")
    d.add_argument("--model", default="cnn", help="model spec")
    d.add_argument("--optimizer", default="adam", help="optimizer spec")
    d.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=1e-2)
    d.add_argument("--batch-size", type=int, default=100)
    d.add_argument("--preprocess", default="standardize")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overfit-steps", type=int, default=300)
    d.add_argument(
        "--signal-steps",
        default="0,100,500",
        help="comma-separated steps of an ordinary run at which to report signal propagation",
    )
    d.add_argument("--lr-min", type=float, default=1e-5)
    d.add_argument("--lr-max", type=float, default=1.0)
    d.add_argument("--lr-num", type=int, default=32, help="learning rates tried by the LR finder")
    d.add_argument(
        "--lr-steps",
        type=int,
        default=100,
        help="steps per learning rate (sweep) or of the one run (range)",
    )
    d.add_argument(
        "--lr-method",
        choices=("sweep", "range"),
        default="sweep",
        help="sweep: --lr-num rates trained side by side in one vmapped program; "
        "range: Smith's range test, one run with the rate rising from --lr-min to --lr-max",
    )
    d.add_argument(
        "--out",
        default=None,
        help="folder for diagnose.json and plots (default runs/diagnose-<time>)",
    )

    b = sub.add_parser(
        "bench",
        help="benchmark optimizers: problems x optimizers x seeds, or compare result files",
        description="jtricks bench [--suite quick|full] runs the suite and writes results.json, "
        "results.md, curves.png and profile.png to --out; "
        "jtricks bench compare A.json B.json ... prints side-by-side tables with speedups.",
    )
    b.add_argument("compare", nargs="*", metavar="compare FILE", help="compare FILE FILE ...")
    b.add_argument(
        "--suite", default="quick", help="quick (under 5 min on 2 CPU cores) or full (GPU)"
    )
    b.add_argument("--optimizers", default=None, help="comma-separated subset, e.g. sgd,adam")
    b.add_argument(
        "--problems", default=None, help="comma-separated subset of the suite's problems"
    )
    b.add_argument("--seeds", type=int, default=None, help="seeds per optimizer (suite default)")
    b.add_argument("--out", default=None, help="results folder (default runs/bench-<suite>-<time>)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    from jtricks.bench import compare, markdown, plot, run_suite

    if args.compare:
        if args.compare[0] != "compare":
            raise ConfigError(
                f"unknown bench action {args.compare[0]!r}; use `jtricks bench [--suite ...]` or "
                "`jtricks bench compare A.json B.json`",
                param="compare",
            )
        print(compare(args.compare[1:]))
        return 0
    from jtricks.run import _prepare_out, write_json

    split = lambda v: None if v is None else [x for x in split_top_level(v, ",") if x]  # noqa: E731
    out = (
        args.out
        if args.out is not None
        else str(Path("runs") / time.strftime(f"bench-{args.suite}-%Y%m%d-%H%M%S"))
    )
    # validate names before creating anything
    from jtricks.bench.problems import SUITES, suite_problems
    from jtricks.errors import unknown_name

    if args.suite not in SUITES:
        raise unknown_name("suite", args.suite, SUITES)
    names = {p.name for p in suite_problems(args.suite)}
    for name in split(args.problems) or []:
        if name not in names:
            raise unknown_name("problem", name, names, param="problems")
    from jtricks.optim import build_optimizer

    for spec in split(args.optimizers) or []:
        try:
            build_optimizer(spec)  # any spec: jtricks' names, optax.*, contrib.*, module:factory
        except ConfigError as e:
            raise ConfigError(str(e), param="optimizers") from None
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {args.seeds}", param="seeds")
    run_dir = _prepare_out(out)
    results = run_suite(
        args.suite,
        optimizers=split(args.optimizers),
        problems=split(args.problems),
        seeds=args.seeds,
        progress=args.progress,
    )
    from jtricks.bench.runner import jsonable
    from jtricks.run import _atomic_write

    write_json(run_dir / "results.json", jsonable(results))
    md = markdown(results)

    def write_md(tmp: str) -> None:
        Path(tmp).write_text(md)

    _atomic_write(run_dir / "results.md", write_md)
    plot(results, run_dir)
    print(md)
    print(f"results.json, results.md, curves.png and profile.png in {run_dir}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from jtricks.diagnostics import diagnose, verdict_table

    try:
        signal_steps = [int(s) for s in args.signal_steps.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--signal-steps must be comma-separated integers such as 0,100,500; got {args.signal_steps!r}",
            param="signal_steps",
        ) from None
    out = (
        args.out
        if args.out is not None
        else str(Path("runs") / time.strftime("diagnose-%Y%m%d-%H%M%S"))
    )
    result = diagnose(
        dataset=args.dataset,
        model=args.model,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        preprocess=args.preprocess,
        seed=args.seed,
        overfit_steps=args.overfit_steps,
        signal_steps=signal_steps,
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        lr_num=args.lr_num,
        lr_steps=args.lr_steps,
        lr_method=args.lr_method,
        out=out,
    )
    print(verdict_table(result))
    print(
        f"\n{'all checks passed' if result['passed'] else 'some checks FAILED'}; plots and diagnose.json in {result['out']}"
    )
    return 0 if result["passed"] else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from jtricks.run import TrainConfig, train
    from jtricks.training.progress import RichReporter

    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi):
        if any(v is None for v in multi):
            raise ConfigError(
                "--coordinator, --num-processes and --process-id go together; got "
                f"{args.coordinator!r}, {args.num_processes!r}, {args.process_id!r}",
                param="coordinator",
            )
        from jtricks.training.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)

    config = TrainConfig(
        dataset=args.dataset,
        task=args.task,
        model=args.model,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps=args.steps,
        val_fraction=args.val_fraction,
        stratify=args.stratify,
        preprocess=args.preprocess,
        seed=args.seed,
        eval_batch_size=args.eval_batch_size,
        early_stopping=args.early_stopping,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        max_nonfinite=args.max_nonfinite,
        augment=args.augment,
        mixup=args.mixup,
        cutmix=args.cutmix,
        label_smoothing=args.label_smoothing,
        tta=args.tta,
        tta_augment=args.tta_augment,
        accumulate=args.accumulate,
        precision=args.precision,
        fused=args.fused,
        stream=args.stream,
        loader=args.loader,
        chunk=args.chunk,
        ema=args.ema,
        eval_params=args.eval_params,
        swa=args.swa,
        ensemble=args.ensemble,
        pretrained=args.pretrained,
        finetune=args.finetune,
    )
    if args.recipe is not None:
        from jtricks.run import recipe

        if args.resume is not None:
            raise ConfigError(
                "--resume continues with the run's own config; do not also give --recipe",
                param="recipe",
            )
        defaults = TrainConfig()
        # a flag typed on the command line wins even when its value is the default
        # (e.g. `--recipe tricks --tta 1` turns the recipe's TTA off)
        typed = {tok.split("=", 1)[0] for tok in getattr(args, "argv", []) if tok.startswith("--")}
        given = {
            f: getattr(config, f)
            for f in defaults.to_dict()
            if getattr(config, f) != getattr(defaults, f) or FLAGS.get(f) in typed
        }
        config = recipe(args.recipe, **given)
    if args.log_every < 1:
        raise ConfigError(f"--log-every must be >= 1; got {args.log_every}")
    reporter = RichReporter(every=args.log_every) if args.progress else None
    if args.resume is not None:
        default = TrainConfig()
        changed = [
            FLAGS.get(f, f) for f in default.to_dict() if getattr(config, f) != getattr(default, f)
        ]
        if changed or args.out is not None:
            raise ConfigError(
                f"--resume continues with the run's own config.json; do not also give {', '.join(changed + (['--out'] if args.out else []))}",
                param="resume",
            )
        result = train(resume=args.resume, reporter=reporter)
    else:
        out = (
            args.out
            if args.out is not None
            else str(Path("runs") / time.strftime("train-%Y%m%d-%H%M%S"))
        )
        result = train(config, out=out, reporter=reporter)
    if result.history.stopped:
        print(f"stopped: {result.history.stopped}", file=sys.stderr)
    if result.history.diverged and result.out is not None:
        print(
            f"continue from the kept state with other settings: jtricks train --pretrained "
            f"{result.out} --lr <a lower rate> --out <new folder>",
            file=sys.stderr,
        )
    if result.warning:
        print(f"jtricks train: warning: {result.warning}", file=sys.stderr)
    for name, values in result.test.items():  # an ensemble's members, metric by metric
        if name.startswith("member_") and name != "member_loss":
            print(f"member test_{name[7:]}  " + "  ".join(f"{a:.4f}" for a in values))
    if "ema_loss" in result.test:
        ema = {k[4:]: v for k, v in result.test.items() if k.startswith("ema_")}
        print(_metrics_line(ema, prefix="ema test_"))
    if "tta_views" in result.test:
        single = {k[12:]: v for k, v in result.test.items() if k.startswith("single_view_")}
        print(
            _metrics_line(single, prefix="single-view test_")
            + f"  (below: test-time augmentation, {result.test['tta_views']} views)"
        )
    line = _metrics_line(result.test)
    if result.loss_floor is not None:
        line += f"  loss_floor {result.loss_floor:.4f}  gap {result.test['loss'] - result.loss_floor:.4f}"
    print(f"{line}  wall {result.wall_s:.1f}s  run folder {result.out}")
    return 1 if result.history.diverged else 0


def _metrics_line(test: dict, prefix: str = "test_") -> str:
    """``test_loss ...  test_<metric> ...`` for the task's metrics (variants left out)."""
    variants = ("ema_", "single_view_", "member_", "tta_")
    return "  ".join(
        f"{prefix}{k} {v:.4f}"
        for k, v in test.items()
        if isinstance(v, float) and not k.startswith(variants)
    )


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``<jtricks cache>/xla`` (see
    `jtricks.data.cache_dir`), so a program that took over a second to compile is loaded
    from disk by the next run with the same shapes and settings (another seed, a resume).

    Left alone when ``JTRICKS_COMPILATION_CACHE=0`` or when the user already set
    ``jax_compilation_cache_dir`` (``JAX_COMPILATION_CACHE_DIR``). Returns the folder in use.
    """
    import os

    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if os.environ.get("JTRICKS_COMPILATION_CACHE", "1") == "0":
        return None
    from jtricks.data.datasets import cache_dir

    path = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jtricks`` console script; returns the exit status."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    enable_compilation_cache()
    if not isinstance(sys.stderr, QuietThreadTracebacks):
        sys.stderr = QuietThreadTracebacks(sys.stderr)
    # what orbax leaves behind after a failed write, reported by then as one line
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "diagnose":
            return _cmd_diagnose(args)
        if args.command == "bench":
            return _cmd_bench(args)
    except ConfigError as e:
        flag = FLAGS.get(e.param or "")
        prefix = f"argument {flag}: " if flag else ""
        print(f"jtricks {args.command}: error: {prefix}{e}", file=sys.stderr)
        return 2
    except (WriteError, StreamError) as e:  # the run stops; what was saved stays
        print(f"jtricks {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jtricks: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
