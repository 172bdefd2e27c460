"""The inference worker, in both modes: one request in flight, chunks stamped with the observation
time, errors and a dead worker reported (never swallowed)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from control_helpers import INTR, wait_for

from molmoact_edge.hardware.camera import Frame
from molmoact_edge.hardware.geometry import Pose
from molmoact_edge.runtime.control.factory import build_policy
from molmoact_edge.runtime.control.policy import FaultDrill, Observation, PolicySpec, PolicyUnavailable, ScriptedConfig
from molmoact_edge.runtime.control.worker import InferenceWorker, WorkerConfig

HOME = Pose((0.5, 0.0, 0.4), (1.0, 0.0, 0.0, 0.0))


def obs(i: int, t: float) -> Observation:
    f = Frame(np.zeros((INTR.height, INTR.width, 3), np.uint8), None, t, i, INTR)
    return Observation((f,), "test", t, HOME, i)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_one_request_in_flight_and_chunk_stamped(mode):
    spec = PolicySpec(scripted=ScriptedConfig(offset=(0.02, 0.0, 0.0), think_s=0.2, chunk=4))
    with InferenceWorker(spec, WorkerConfig(mode=mode)) as w:
        assert w.submit(obs(7, 123.5))
        assert w.busy and not w.submit(obs(8, 124.0))  # refused, nothing queued
        assert not w.news.is_set() and w.poll() is None  # nothing yet: poll never blocks
        got = []
        wait_for(lambda: got.append(w.poll()) or got[-1] is not None, 10.0, "the chunk")
        chunk = got[-1]
        assert w.news.is_set() and not w.busy
        assert chunk.observation_time == 123.5 and chunk.observation_index == 7 and chunk.anchor == HOME
        assert chunk.actions.shape == (4, 7)
        np.testing.assert_allclose(chunk.actions[:, 0].sum(), 0.02)
        assert chunk.info["inference_s"] >= 0.2
        assert w.requests_sent == 1


@pytest.mark.fault
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_policy_exception_is_reported_with_its_message(mode):
    with InferenceWorker(PolicySpec(drill=FaultDrill("raise", at=0)), WorkerConfig(mode=mode)) as w:
        w.submit(obs(0, 1.0))
        wait_for(lambda: w.error is not None, 10.0, "the error")
        assert "fault drill: policy raised on prediction 0" in w.error
        assert w.error_at is not None and not w.submit(obs(1, 2.0))


@pytest.mark.fault
def test_dead_worker_process_is_reported():
    with InferenceWorker(PolicySpec(), WorkerConfig(mode="process")) as w:
        os.kill(w._proc.pid, signal.SIGKILL)
        wait_for(lambda: w.error is not None, 5.0, "the death to be noticed")
        assert "inference process died" in w.error and "-9" in w.error
        assert w.news.is_set()


@pytest.mark.fault
def test_close_joins_a_hung_process_worker():
    w = InferenceWorker(PolicySpec(drill=FaultDrill("hang", at=0)), WorkerConfig(mode="process")).start()
    w.submit(obs(0, 1.0))
    time.sleep(0.3)
    proc = w._proc
    w.close()
    assert not proc.is_alive()


def test_molmoact_policy_is_refused_clearly(tmp_path):
    with pytest.raises(PolicyUnavailable, match="bad MolmoAct policy options"):
        build_policy(PolicySpec(kind="molmoact"))
    with pytest.raises(ValueError, match="is not a directory; export one"):
        build_policy(PolicySpec(kind="molmoact", options={"bundle": str(tmp_path / "nope")}))
    with pytest.raises(ValueError, match="PolicySpec.kind must be one of"):
        PolicySpec(kind="gpt")
