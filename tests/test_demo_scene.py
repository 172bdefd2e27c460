"""The rendered tabletop: seeded scenes, the camera's geometry against MuJoCo's own rendering, the
privileged expert, and one short closed-loop episode through franky-sim with the rendered camera."""

from __future__ import annotations

import json

import numpy as np
import pytest

from control_helpers import sim_available

from molmoact_edge.hardware.render_camera import SceneRenderer  # first: it picks MuJoCo's headless GL
from molmoact_edge.hardware.scene import COLOURS, SUCCESS_RADIUS_M, Scene, camera_intrinsics, project
from molmoact_edge.runtime.control.expert import expert_actions

INITIAL_Q = (0.0, 0.0, 0.0, -1.57, 0.0, 1.57, 0.785)  # franky-sim's start configuration


def test_scene_is_a_function_of_its_seed():
    a, b = Scene.from_seed(1000), Scene.from_seed(1000)
    assert a == b
    assert Scene.from_seed(1001) != a
    for seed in range(50):
        s = Scene.from_seed(seed)
        # the colour word alone names the object, and so does the shape word
        assert len({o.colour for o in s.objects}) == len({o.shape for o in s.objects}) == len(s.objects) == 3
        xy = np.array([o.xy for o in s.objects])
        gaps = [np.linalg.norm(xy[i] - xy[j]) for i in range(len(xy)) for j in range(i)]
        assert min(gaps) >= 0.16
        assert s.instruction == f"move to the {s.target_object.colour} {s.target_object.shape}"
    assert len({o.colour for o in Scene.from_seed(7, n_objects=4).objects}) == 4
    for bad in (0, 5):  # four colours
        with pytest.raises(ValueError, match="n_objects"):
            Scene.from_seed(0, n_objects=bad)


@pytest.fixture(scope="module")
def rendered():
    scene = Scene.from_seed(1003)
    r = SceneRenderer(scene)
    q = np.zeros(r.model.nq)
    q[:7] = INITIAL_Q
    rgb, depth = r.render(q)
    r.close()
    return scene, rgb, depth


def test_render_shows_each_object_where_the_projection_puts_it(rendered):
    # Our own pinhole model (intrinsics + camera pose) against MuJoCo's renderer: the pixel we
    # project an object's centre to must show that object's colour, at the depth we compute.
    scene, rgb, depth = rendered
    intr = camera_intrinsics()
    assert rgb.shape == (intr.height, intr.width, 3) and depth.shape == rgb.shape[:2]
    for o in scene.objects:
        u, v = project(o.centre)[0]
        assert 0 <= u < intr.width and 0 <= v < intr.height
        patch = rgb[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2].reshape(-1, 3).astype(float).mean(0)
        want = np.array(COLOURS[o.colour])
        cos = patch @ want / (np.linalg.norm(patch) * np.linalg.norm(want))
        assert cos > 0.95, (o.name, patch)
        from molmoact_edge.hardware.scene import CAMERA_POS, camera_pose

        z = ((o.centre - np.array(CAMERA_POS)) @ camera_pose())[2]
        assert z - 2 * o.half_size < depth[int(v), int(u)] < z + 0.001


def test_expert_reaches_the_goal_height_first_in_bounded_steps():
    start, goal = np.array([0.55, 0.0, 0.52]), np.array([0.40, -0.15, 0.15])
    a = expert_actions(start, goal, 0.02, 40)
    assert np.all(np.abs(a[:, :3]) <= 0.02 + 1e-12)
    assert np.all(a[:, 3:6] == 0) and np.all(a[:, 6] == 1.0)
    assert np.linalg.norm(start + a[:, :3].sum(0) - goal) < 1e-9
    # down first: 18 full steps leave 1 cm (at most a step), and only then does the hand move across
    np.testing.assert_allclose(a[:18, :3], np.tile([0.0, 0.0, -0.02], (18, 1)), atol=1e-12)
    np.testing.assert_allclose(a[18, :3], [-0.02, -0.02, -0.01], atol=1e-12)
    # across: full steps on each axis still farther than a step, then the remainder
    np.testing.assert_allclose(a[19:25, :2], np.full((6, 2), -0.02), atol=1e-12)
    np.testing.assert_allclose(a[25, :3], [-0.01, -0.01, 0.0], atol=1e-12)
    assert np.all(a[26:, :3] == 0)
    # x's steps do not depend on how far y has to go
    b = expert_actions(start, np.array([0.40, 0.25, 0.15]), 0.02, 40)
    np.testing.assert_allclose(b[:, 0], a[:, 0])


@pytest.mark.sim
def test_eval_cli_runs_one_expert_episode_in_the_rendered_scene(tmp_path, capsys):
    if not sim_available():
        pytest.skip("franky-sim / franky-control not installed: pip install molmoact-edge[robot,test]")
    import json

    from molmoact_edge.main import main

    code = main(["eval", "--policy", "expert", "--episodes", "1", "--seed", "1000", "--limit", "20",
                 "--gif-dir", str(tmp_path), "--json"])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert 0.0 <= d["success_rate"] <= 1.0 and len(d["per_episode"]) == 1
    ep = d["per_episode"][0]
    assert ep["seed"] == 1000 and ep["instruction"] == Scene.from_seed(1000).instruction
    assert ep["gif"] and (tmp_path / "episode-1000.gif").stat().st_size > 0  # the rendered camera's frames
    # franky-sim runs in lockstep with franky (hardware/sim_launch.py) and the limit is simulated time,
    # so a loaded CPU slows the episode down but does not change its outcome
    assert ep["fault"] is None and ep["reason"] == "success" and d["success_rate"] == 1.0, ep
    assert ep["final_distance_m"] <= SUCCESS_RADIUS_M and ep["steps"] >= 1


def test_eval_cli_usage_errors(capsys):
    from molmoact_edge.main import main

    assert main(["eval", "--policy", "molmoact"]) == 2
    assert "--bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own refusal
        main(["eval", "--policy", "expert", "--seed", "-1"])
    assert e.value.code == 2


def test_eval_trace_frames_measures_a_bundle_on_held_out_frames(bundle_a, capsys):
    # A random bundle (fixture A): the measure runs end to end on rendered held-out frames; the
    # rate is whatever it is, the record must be complete.
    import json

    from molmoact_edge.main import main

    assert main(["eval", "--bundle", str(bundle_a), "--episodes", "1", "--seed", "1000", "--trace-frames", "1",
                 "--max-new-tokens", "512", "--max-actions", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["frames"] == 1 and 0.0 <= d["trace_hit_rate"] <= 1.0
    row = d["per_frame"][0]
    assert row["instruction"] == Scene.from_seed(1000).instruction and row["trace"]  # the grammar always yields one
    assert main(["eval", "--bundle", str(bundle_a), "--seed", "5", "--trace-frames", "1"]) == 2  # training seeds


def test_an_interrupted_episode_ends_the_evaluation(monkeypatch):
    # Ctrl-C/SIGTERM reach the control loop, which stops the arm and returns "interrupted"; the
    # evaluation must end there instead of starting the next episode's simulator.
    from molmoact_edge.runtime.control import evaluate as ev

    ran = []

    def fake_episode(seed, spec_for, config, gif):
        ran.append(seed)
        return ev.EpisodeResult(seed=seed, instruction="", success=False, time_to_success_s=None,
                                wall_time_to_success_s=None, final_distance_m=1.0, min_distance_m=1.0,
                                reason="interrupted", fault="interrupted: interrupted by SIGTERM", steps=0,
                                ticks=0, commands=0)

    monkeypatch.setattr(ev, "run_episode", fake_episode)
    report = ev.evaluate([1000, 1001, 1002], ev.expert_spec, "expert")
    assert ran == [1000] and report.stopped == "interrupted" and len(report.episodes) == 1


def test_an_episode_that_raises_is_a_failure_and_two_in_a_row_end_the_evaluation(monkeypatch):
    # An inference worker that misses its start-up deadline on a starved CPU used to abort the whole
    # evaluation and lose every episode already run.
    from molmoact_edge.runtime.control import evaluate as ev

    ran, broken = [], set()

    def episode(seed, spec_for, config, gif):
        ran.append(seed)
        if seed in broken:
            raise RuntimeError("inference worker did not start within 60 s")
        return ev.EpisodeResult(seed=seed, instruction="", success=True, time_to_success_s=2.0,
                                wall_time_to_success_s=3.0, final_distance_m=0.01, min_distance_m=0.01,
                                reason="success", fault=None, steps=3, ticks=30, commands=30)

    monkeypatch.setattr(ev, "run_episode", episode)
    broken.update({1001})
    report = ev.evaluate([1000, 1001, 1002], ev.expert_spec, "expert")
    assert ran == [1000, 1001, 1002] and report.stopped is None
    failed = report.episodes[1]
    assert not failed.success and failed.reason == "error" and "did not start" in failed.fault
    assert failed.instruction == Scene.from_seed(1001).instruction
    assert report.success_rate == pytest.approx(2 / 3)
    assert json.loads(report.to_json(), parse_constant=pytest.fail)["per_episode"][1]["min_distance_m"] is None

    ran.clear()
    broken.update({1003, 1004})
    report = ev.evaluate([1002, 1003, 1004, 1005], ev.expert_spec, "expert")
    assert ran == [1002, 1003, 1004] and "two episodes in a row" in report.stopped
    assert [e.reason for e in report.episodes] == ["success", "error", "error"]


def test_state_file_never_returns_a_half_written_state(tmp_path):
    # The simulator publishes qpos through a sequence-locked file; a reader that sees an odd sequence
    # (a write in progress) must not return the torn record.
    from molmoact_edge.hardware.scene_server import StateFile

    w = StateFile(tmp_path / "s.bin", 4, create=True)
    r = StateFile.open_reader(tmp_path / "s.bin")
    assert r.nq == 4 and r.read() is None  # nothing published yet
    w.write(np.arange(4.0))
    assert np.array_equal(r.read(), np.arange(4.0))
    w._mm[0] += 1  # a writer stopped mid-write
    w._mm[2:] = -1.0
    assert r.read(tries=3) is None


def test_mujoco_imported_first_without_a_display_is_a_clear_error_not_an_abort():
    """MuJoCo fixes its GL platform at its first import. Imported before render_camera without
    MUJOCO_GL it takes GLFW, which needs a display: rendering then failed, and a few tries later GLFW
    aborted the whole process (a test run died so). It is now a CameraError naming the fix."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    code = ("import mujoco\n"
            "from molmoact_edge.hardware.render_camera import SceneRenderer\n"
            "from molmoact_edge.hardware.scene import Scene\n"
            "for _ in range(8):\n"
            "    try:\n"
            "        SceneRenderer(Scene.from_seed(0))\n"
            "    except Exception as e:\n"
            "        last = e\n"
            "print(type(last).__name__, last)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CameraError") and "MUJOCO_GL=egl" in proc.stdout, proc.stdout
