"""`jtricks.training.processes`' rules, without a second process: the peer watcher's
beats against a stand-in coordination service, the lost-peer test, and agreement with
one process. The multi-process paths run for real in tests/test_distributed.py and
tests/test_signals.py."""

from __future__ import annotations

import threading

import jax
import pytest

from jtricks.training import processes


class Service:
    """The key-value store of JAX's coordination service, as the watcher uses it; peer 1
    beats ``beats`` times, then falls silent (or says it is done)."""

    def __init__(self, beats: int, then: str | None = None, fail_after: int | None = None):
        self.store, self.calls, self.beats, self.then = {}, 0, beats, then
        self.fail_after = fail_after

    def key_value_set(self, key, value, allow_overwrite=False):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        self.store[key] = value
        if self.calls <= self.beats:
            self.store[f"{processes.BEAT}1"] = str(self.calls)
        elif self.then is not None:
            self.store[f"{processes.BEAT}1"] = self.then

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


class Left(Exception):
    pass


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)

    def leave(line, status=1):
        raise Left(line)

    monkeypatch.setattr(processes, "leave", leave)


def _watch(service, seconds=0.05, rounds=200):
    ending = threading.Event()
    timer = threading.Timer(rounds * 0.005, ending.set)  # a run that ends by itself
    timer.start()
    try:
        processes._beat(service, seconds, 0.005, ending, threading.Lock())
    finally:
        timer.cancel()


def test_a_silent_peer_ends_the_run_after_the_bound(two_processes):
    service = Service(beats=5)
    with pytest.raises(Left, match=r"process 1 of 2 stopped answering for 0.05 s"):
        _watch(service)
    assert service.calls > 5  # not while it beat


def test_a_beating_or_finished_peer_is_not_lost(two_processes):
    _watch(Service(beats=10**9), rounds=40)  # beats throughout: the run ends by itself
    _watch(Service(beats=3, then=processes.DONE), rounds=40)  # done, waiting at exit


def test_an_unreachable_coordinator_ends_the_run(two_processes):
    with pytest.raises(Left, match=r"lost the coordinator, process 0 \(UNAVAILABLE"):
        _watch(Service(beats=10**9, fail_after=3))


def test_lost_peers_are_told_from_other_errors(monkeypatch):
    error = RuntimeError("UNKNOWN: Gloo all-reduce failed: ... Connection reset by peer")
    assert not processes.lost_process(error)  # one process: nobody to lose
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert processes.lost_process(error)
    assert not processes.lost_process(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))


@pytest.mark.parametrize("kind", ["collective", "checkpoint"])
def test_a_lost_peer_ends_the_command_with_one_line(monkeypatch, kind):
    """A peer gone away mid-collective, in the training program or in a checkpoint write's
    collective (a `WriteError` around gloo's error): one line and status 1, at once."""
    from jtricks import cli
    from jtricks.cli import train
    from jtricks.errors import WriteError

    gloo = "UNKNOWN: Gloo AllGather failed: ... Connection closed by peer [127.0.0.1]:724"
    error = jax.errors.JaxRuntimeError(gloo)
    if kind == "checkpoint":
        error = WriteError("checkpoint run/checkpoints/best/epoch-000004", error)

    def run(args, flags):
        raise error

    left = []

    def leave(line, status=1):
        left.append((line, status))
        raise SystemExit(status)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(processes, "leave", leave)
    with pytest.raises(SystemExit):
        cli.main(["train", "--no-progress"])
    ((line, status),) = left
    assert status == 1 and "another process of this run stopped" in line
    assert "--resume RUN_DIR" in line and "\n" not in line


def test_one_process_agrees_with_itself_and_is_not_watched():
    assert processes.all_agree(True) and not processes.all_agree(False)
    assert processes.watch_peers(1.0) is None
