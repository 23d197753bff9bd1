"""What `gpu_suite.py` runs: its parts, each a share of the budget and the benchmark
processes it runs in turn, at full size on the GPU and at toy size (``--tiny``) on the
CPU. The shares were sized from the H200 run of 2026-12-04 (see `gpu_suite.py`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    """One process: ``script`` (a path under benchmarks/, or ``jtricks`` for the CLI) with
    its arguments at full and at toy size."""

    label: str
    script: str
    full: str
    tiny: str  # "" skips the run at toy size (it adds no code path)

    def argv(self, tiny: bool) -> list[str]:
        return shlex.split(self.tiny if tiny else self.full)


@dataclass(frozen=True)
class Part:
    name: str
    share: float  # of the whole budget
    runs: tuple[Run, ...] = field(default_factory=tuple)


_MLP = "--model 'mlp(features=(8,))'"
_TINY_DATA = "--dataset 'mnist1d(num_samples=600)'"
_TINY_RESNET = "--shape 8,8,3 --batch-size 4 --steps-per-epoch 2 --epochs 1 --repeats 1"
PARTS = (  # the headline figures first; bench last, with whatever the budget has left
    Part(
        "fit",
        0.16,  # 40 s for its first two runs on the H200 (2026-12-04), then calls, guard
        (
            Run("mlp", "bench_fit.py", "--model mlp --repeats 5 --min-time 0.5", ""),
            Run(
                "cnn",
                "bench_fit.py",
                "--model cnn --repeats 5 --min-time 0.5",
                f"{_MLP} --epochs 1 --repeats 1 --min-time 0.02 {_TINY_DATA}",
            ),
            Run(
                "calls",
                "bench_fit_calls.py",
                "--examples 2000 --features 40 --steps 5 --val 500 --repeats 21",
                "--examples 200 --features 8 --steps 2 --val 50 --repeats 2",
            ),
            Run(  # last: the part's budget cuts it before the headline figures
                "guard",
                "bench_guard.py",
                "--model mlp --repeats 21",
                f"{_MLP} --shape 4 --num-classes 3 --batch-size 8 --steps 3 --repeats 1",
            ),
        ),
    ),
    Part(
        "train_step",
        0.31,
        (
            Run(
                "jax",
                "bench_train_step.py",
                "--model resnet18 --shape 32,32,3 --batch-size 512 --precision bf16 "
                "--arms hand_scan,fit,fit_fused --steps-per-epoch 20 --repeats 3",
                f"{_MLP} --precision bf16 {_TINY_RESNET}",
            ),
            Run(
                "torch",
                "baselines/torch_resnet18.py",
                "--batch-size 512 --precision bf16 --arms eager,compile,compile_graphs "
                "--steps-per-epoch 20 --repeats 3",
                "--widths 4,4,4,4 --arms eager " + _TINY_RESNET,
            ),
        ),
    ),
    Part(
        "train",
        0.09,
        (
            Run(
                "defaults",
                "bench_train_cli.py",
                "--warm 1",
                "--warm 1 --args \"--model 'mlp(features=(8,))' --steps 20 --dataset "
                "'mnist1d(num_samples=600)'\"",
            ),
        ),
    ),
    Part(
        "ensemble",
        0.08,
        (
            Run(
                "cnn",
                "bench_ensemble.py",
                "--model cnn --epochs 2 --repeats 2",
                f"{_MLP} --members 2 --epochs 1 --repeats 1 {_TINY_DATA}",
            ),
        ),
    ),
    Part(
        "lr_finder",
        0.1,
        (
            Run(
                "cnn",
                "bench_lr_finder.py",
                "--model cnn --repeats 2",
                f"{_MLP} --num 4 --steps 5 --repeats 1 {_TINY_DATA}",
            ),
        ),
    ),
    Part(
        "optimizer_update",
        0.09,
        (
            Run(
                "adam",
                "bench_optimizer_update.py",
                "--total 67108864 --leaves 1,512 --impls optax,fused --repeats 3 --optimizers adam",
                "--total 4096 --leaves 1,8 --repeats 1 --optimizers adam",
            ),
        ),
    ),
    Part(
        "sweep",
        0.1,
        (
            Run(
                "mlp",
                "bench_sweep.py",
                "--model mlp --repeats 2",
                f"{_MLP} --rates 2 --epochs 1 --repeats 1 {_TINY_DATA}",
            ),
            Run(
                "search",
                "bench_search.py",
                "--model mlp --trials 8 --repeats 1",
                f"{_MLP} --trials 2 --epochs 1 --repeats 1 {_TINY_DATA}",
            ),
        ),
    ),
    Part(
        "step_records",
        0.07,
        (
            Run(
                "cnn",
                "bench_step_records.py",
                "--model cnn --repeats 5",
                f"{_MLP} --epochs 1 --repeats 1 {_TINY_DATA}",
            ),
            Run(
                "callbacks",
                "bench_callbacks_ahead.py",
                "--model cnn --repeats 3",
                f"{_MLP} --epochs 2 --every 1 --repeats 1 {_TINY_DATA}",
            ),
        ),
    ),
    Part(
        "bench",
        1.0,  # the rest of the budget
        (
            Run(
                "quick",
                "jtricks",
                "--suite quick",
                "--suite quick --workloads regression_mlp --algorithms nadamw --trials 1 "
                "--studies 1",
            ),
        ),
    ),
)
