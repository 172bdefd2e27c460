"""The one step API (Pipeline.act -> StepResult) on the real fixture checkpoint and its bundle:
one grammar and one decoder per key, a step without an unnorm key on a checkpoint with several,
and a model that produces NaN never yields an action (generate exits 1; the robot does not move)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch side: pip install '.[export]' (absent on a robot install)")
from conftest import GoldenCase
from control_helpers import check_commands, sim, write_folder  # noqa: F401  (sim is a fixture)

from molmoact_edge.export.torch_backend import open_checkpoint
from molmoact_edge.runtime.engine.bundle import sha256_file
from molmoact_edge.runtime.engine.events import ActionComplete
from molmoact_edge.runtime.engine.generate import NonFiniteError
from molmoact_edge.runtime.engine.pipeline import open_bundle

KEY = "fractal20220817_data"


@pytest.fixture(scope="module")
def bundle(bundle_a):
    return bundle_a  # the session's shared export (read only here; MOLMOACT_TEST_BUNDLES where given)


@pytest.fixture(scope="module")
def nan_bundle(bundle, tmp_path_factory):
    """The bundle with every embedding row NaN and the manifest's hashes recomputed: a damaged
    export that passes every integrity check."""
    out = tmp_path_factory.mktemp("nan") / "bundle"
    shutil.copytree(bundle, out)
    emb = np.load(out / "embeddings.npy")
    np.save(out / "embeddings.npy", np.full_like(emb, np.nan))
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in manifest["files"]:
        manifest["files"][rel] = sha256_file(out / rel)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="module")
def two_key_checkpoint(checkpoint_a, tmp_path_factory):
    """Fixture A's checkpoint with a second norm_stats entry (other statistics, same 7 dims)."""
    out = tmp_path_factory.mktemp("two_keys") / "checkpoint"
    out.mkdir()
    for f in checkpoint_a.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    config = json.loads((checkpoint_a / "config.json").read_text())
    other = json.loads(json.dumps(config["norm_stats"][KEY]))
    other["action"]["q99"] = [v * 2 for v in other["action"]["q99"]]
    config["norm_stats"]["bridge_orig"] = other
    (out / "config.json").write_text(json.dumps(config))
    return out


def _generate(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", *args], capture_output=True,
                          text=True, timeout=timeout)


def _case_args(fixture_a, name="single_256"):
    case = GoldenCase(fixture_a, name)
    return ["--image", str(case.image_paths[0]), "--instruction", case.instruction]


def test_act_reads_the_step_and_shares_grammar_and_decoder_per_key(bundle, fixture_a):
    case = GoldenCase(fixture_a, "single_640x480")
    with open_bundle(bundle) as pipe:
        g = pipe.grammar(None, 2)
        assert pipe.grammar(KEY, 2) is g and g.decoder is pipe.reading(KEY).decoder is pipe.reading().decoder
        seen = []
        res = pipe.act(case.images(), case.instruction, max_new_tokens=300, max_actions=2, on_event=seen.append)
        assert pipe.grammar(KEY, 2) is g  # the step built nothing new
    assert res.parse_errors == [] and res.actions_error is None and res.unnorm_key == KEY
    acts = [t.event for t in res.events if isinstance(t.event, ActionComplete)]
    np.testing.assert_array_equal(np.stack([a.values for a in acts]), res.actions)
    np.testing.assert_array_equal(np.stack([a.normalized for a in acts]), res.normalized_actions)
    assert [t.event for t in seen] == [t.event for t in res.events]
    d = json.loads(res.to_json())
    for field in ("token_ids", "text", "prompt_tokens", "new_tokens", "stopped", "template", "llm_forwards",
                  "forced_tokens", "timings_ms", "tokens_per_s", "depth", "trace", "actions", "parse_errors",
                  "grammar", "events", "actions_error", "unnorm_key"):
        assert field in d, field
    assert d["token_ids"] == res.token_ids and d["new_tokens"] == len(res.token_ids) <= 300


def test_torch_reference_and_bundle_give_the_same_step(bundle, checkpoint_a, fixture_a):
    case = GoldenCase(fixture_a, "single_256")
    with open_checkpoint(checkpoint_a) as ref, open_bundle(bundle) as ort_pipe:
        a = ref.act(case.images(), case.instruction, max_new_tokens=256, max_actions=8)
        b = ort_pipe.act(case.images(), case.instruction, max_new_tokens=256, max_actions=8)
    assert a.token_ids == b.token_ids and a.forwards == b.forwards
    np.testing.assert_array_equal(a.actions, b.actions)


def test_generate_without_unnorm_key_on_a_checkpoint_with_several(two_key_checkpoint, checkpoint_a, fixture_a):
    base = ["--checkpoint", str(two_key_checkpoint), *_case_args(fixture_a), "--json"]
    for extra in ([], ["--no-grammar", "--max-new-tokens", "24"]):
        proc = _generate(base + extra)
        assert proc.returncode == 0, proc.stderr
        d = json.loads(proc.stdout)
        assert d["actions"] == [] and d["unnorm_key"] is None
        assert KEY in d["actions_error"] and "bridge_orig" in d["actions_error"] and "--unnorm-key" in d["actions_error"]
        # ids and text need no key: the same as on the one-key checkpoint
        one = json.loads(_generate(["--checkpoint", str(checkpoint_a), *_case_args(fixture_a), "--json", *extra]).stdout)
        assert d["token_ids"] == one["token_ids"] and d["text"] == one["text"]
        if not extra:
            assert d["parse_errors"] == [] and len(d["actions_normalized"]) >= 1
            assert d["actions_normalized"] == one["actions_normalized"]
            assert all(e["values"] is None for e in d["events"] if e["type"] == "action")
    text = _generate(base[:-1])
    assert text.returncode == 0 and "bridge_orig" in text.stderr and "unavailable" in text.stderr
    keyed = json.loads(_generate(base + ["--unnorm-key", "bridge_orig"]).stdout)
    assert keyed["actions_error"] is None and len(keyed["actions"]) >= 1 and keyed["unnorm_key"] == "bridge_orig"


@pytest.mark.fault
def test_nan_model_ends_the_step_with_an_error(nan_bundle, fixture_a):
    with open_bundle(nan_bundle) as pipe, pytest.raises(NonFiniteError, match="NaN"):
        pipe.act(GoldenCase(fixture_a, "single_256").images(), "close the box")
    for extra in ([], ["--no-grammar"]):
        proc = _generate(["--bundle", str(nan_bundle), *_case_args(fixture_a), "--json", *extra])
        assert proc.returncode == 1, proc.stdout
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "NaN" in lines[0], proc.stderr


@pytest.mark.fault
@pytest.mark.sim
def test_nan_model_never_moves_the_arm(sim, nan_bundle, tmp_path):  # noqa: F811
    from molmoact_edge.hardware.franky_arm import FrankyArm, FrankyConfig
    from molmoact_edge.hardware.replay import ReplayConfig, open_replay
    from molmoact_edge.runtime.control.executor import WatchdogConfig
    from molmoact_edge.runtime.control.loop import ControlLoop, LoopConfig
    from molmoact_edge.runtime.control.policy import PolicySpec
    from molmoact_edge.runtime.control.runlog import read_log
    from molmoact_edge.runtime.control.safety import SafetyConfig
    from molmoact_edge.runtime.control.worker import WorkerConfig

    rate = 50.0
    write_folder(tmp_path / "frames", 10)
    safety = SafetyConfig(dynamics_factor=0.2)
    log_path = tmp_path / "run.jsonl"
    spec = PolicySpec(kind="molmoact", options={"bundle": str(nan_bundle), "max_actions": 2})
    # At load 20 a niced worker took over 60 s to load the bundle, and a replay frame aged 2.6 s: neither is
    # this test's subject.
    cfg = LoopConfig(instruction="close the box", rate_hz=rate, safety=safety,
                     worker=WorkerConfig(mode="process", start_timeout_s=300.0),
                     watchdog=WatchdogConfig(frame_timeout_s=10.0),
                     log_path=str(log_path), max_duration_s=8.0, status_interval_s=1e9)
    with open_replay(ReplayConfig(str(tmp_path / "frames"), loop=True)) as cam, \
            FrankyArm(FrankyConfig(sim.host, dynamics_factor=safety.dynamics_factor,
                                   state_timeout_s=2.0)) as arm:  # a loaded CI machine: not this test's subject
        cam.wait_first_frame()
        with ControlLoop([cam], arm, spec, cfg, status_stream=None) as loop:
            result = loop.run()
    records = read_log(log_path)
    audit = check_commands(records, safety, 1.0 / rate)
    assert result.chunks == 0 and audit["commands"] == 0, (result, audit)
    assert result.reason == "fault" and result.fault.kind == "policy_error", result
    assert "NonFiniteError" in result.fault.message or "NaN" in result.fault.message
