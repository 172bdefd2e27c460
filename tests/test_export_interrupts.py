"""A Ctrl-C during an export is never lost, even when the code it lands in swallows it (torch's ONNX
exporter can: export/interrupts.py). The real SIGINT goes through the real handler; what a library
does with the KeyboardInterrupt is imitated by code that catches it."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import needs_torch

from molmoact_edge.export.interrupts import InterruptGuard


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, whatever the test run inherited (a background job of a
    non-interactive shell starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # os.kill runs the handler before it returns


def swallowing_ctrl_c() -> None:
    """Like torch's exporter when the interrupt lands in its lazy imports: the KeyboardInterrupt turns
    into another error, which a fallback path catches."""
    try:
        try:
            ctrl_c()
        except KeyboardInterrupt as e:
            raise AttributeError("partially initialized module") from e
    except Exception:
        pass


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check(python_sigint):
    with InterruptGuard() as guard:
        guard.check()  # nothing yet
        swallowing_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            guard.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_still_raises_at_once_where_nothing_swallows_it(python_sigint):
    with InterruptGuard() as guard, pytest.raises(KeyboardInterrupt):
        ctrl_c()
    assert guard.seen == 1


def test_deferred_block_runs_to_its_end_and_remembers_the_ctrl_c(python_sigint):
    steps = []
    with InterruptGuard() as guard:
        with guard.deferred():
            ctrl_c()
            steps.append("after the Ctrl-C")
        assert steps == ["after the Ctrl-C"]
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()  # raising again once the block is over
    assert guard.seen == 2


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with InterruptGuard() as guard:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            ctrl_c()
            guard.check()
        assert guard.seen == 0
    finally:
        signal.signal(signal.SIGINT, previous)


@needs_torch
def test_export_stops_on_a_ctrl_c_the_exporter_swallowed(python_sigint, tmp_path, monkeypatch):
    """The interrupt lands inside the vision export, which swallows it and then succeeds (the
    exporter's fallback strategy): the export must still end, with no bundle and no temporary folder."""
    from molmoact_edge.export import onnx_export
    from molmoact_edge.export.tiny import write_checkpoint

    ckpt = tmp_path / "checkpoint"
    write_checkpoint(ckpt, "tiny", 0)
    real = onnx_export.export_vision

    def export_vision(*args, **kwargs):
        swallowing_ctrl_c()
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_vision", export_vision)
    stages = []
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_bundle(ckpt, out, progress=stages.append)
    assert len(stages) == 2 and "vision" in stages[-1]  # stopped at the next stage boundary
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


@needs_torch
def test_export_turns_an_exporter_error_caused_by_ctrl_c_into_the_interrupt(python_sigint, tmp_path, monkeypatch):
    """All of the exporter's strategies failed because of the interrupt: a TorchExportError with a
    traceback before; the interrupt now."""
    from molmoact_edge.export import onnx_export
    from molmoact_edge.export.tiny import write_checkpoint

    ckpt = tmp_path / "checkpoint"
    write_checkpoint(ckpt, "tiny", 0)

    def export_vision(*args, **kwargs):
        swallowing_ctrl_c()
        raise RuntimeError("Failed to export the model with torch.export")

    monkeypatch.setattr(onnx_export, "export_vision", export_vision)
    with pytest.raises(KeyboardInterrupt) as info:
        onnx_export.export_bundle(ckpt, tmp_path / "bundle", progress=lambda s: None)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
