"""Cameras: pyrealsense2 software-device recordings (.db3), image folders, recording, and the
RealSense driver's no-device path. Only a physical camera is faked away: the live tests are marked
`hardware` and skip when none is attached."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import import_or_skip
from control_helpers import INTR, synthetic_frames, write_folder

rs = import_or_skip("pyrealsense2", "robot", apt="libusb-1.0-0")

from molmoact_edge.hardware.camera import CameraError, Frame  # noqa: E402
from molmoact_edge.hardware.realsense import RealSenseCamera, RealSenseConfig, RealSenseDevice, list_devices, resolve_serial  # noqa: E402
from molmoact_edge.hardware.recording import DB3Writer, record  # noqa: E402
from molmoact_edge.hardware.replay import ReplayConfig, open_replay  # noqa: E402


def write_db3(path, frames, fps=30.0, paced=True):
    with DB3Writer(path, INTR, fps=int(fps)) as w:
        for i, (c, d) in enumerate(frames):
            w.write(c, d, i / fps)
            if paced:  # the recorder stamps arrival time; playback in real time follows it
                time.sleep(1 / fps)


def collect(cam, timeout=10.0):
    got: list[Frame] = []
    cam.subscribe(got.append)
    with cam:
        assert cam.finished.wait(timeout), "replay did not reach the end"
    assert cam.error is None
    return got


def match(frames, f):
    return [k for k, (c, d) in enumerate(frames) if np.array_equal(c, f.color) and np.array_equal(d, f.depth)]


def db3_image_counts(path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(path) as db:  # what pyrealsense2 2.59 writes: rosbag2 on SQLite
        rows = db.execute(
            "select t.name, count(*) from messages m join topics t on m.topic_id = t.id "
            "where t.name like '%/image/data%' group by t.name").fetchall()
    return {("color" if "Color" in name else "depth"): n for name, n in rows}


def assert_exact_in_order(frames, got, min_frames):
    """Each delivered frame is pixel-exact, frames come in recorded order and the last one arrives.

    pyrealsense2's playback starts pushing frames before `pipeline.start()` returns, so the first
    few may be skipped; a control loop only ever wants the latest frame.
    """
    ids = [match(frames, f) for f in got]
    assert all(len(i) == 1 for i in ids), f"a replayed frame matches no recorded frame: {ids}"
    order = [i[0] for i in ids]
    assert order == sorted(set(order)) and order[-1] == len(frames) - 1
    assert len(got) >= min_frames


def test_db3_recording_replays_pixel_exact(tmp_path):
    frames = synthetic_frames(30)
    path = tmp_path / "take.db3"
    write_db3(path, frames, paced=True)
    assert db3_image_counts(path) == {"color": 30, "depth": 30}
    got = collect(open_replay(ReplayConfig(str(path), loop=False, realtime=False)))
    assert_exact_in_order(frames, got, min_frames=20)
    assert got[0].intrinsics == INTR
    assert got[0].depth_scale == pytest.approx(0.001)


def test_a_colour_frame_recorded_without_depth_replays_without_depth(tmp_path):
    """librealsense's pipeline completes every frameset with each stream's previous frame: before,
    colour 5, whose depth frame was dropped, came back beside depth 4, a pair never captured."""
    frames = synthetic_frames(20, seed=5)
    missing = {5, 6, 12}
    path = tmp_path / "gaps.db3"
    write_db3(path, [(c, None if k in missing else d) for k, (c, d) in enumerate(frames)], paced=True)
    assert db3_image_counts(path) == {"color": 20, "depth": 17}
    got = collect(open_replay(ReplayConfig(str(path), loop=False, realtime=False)))
    ids = [[k for k, (c, _) in enumerate(frames) if np.array_equal(c, f.color)] for f in got]
    assert all(len(i) == 1 for i in ids), ids
    order = [i[0] for i in ids]
    assert order == sorted(set(order)) and missing & set(order), order  # each once, in order
    for k, f in zip(order, got):
        # its own instant's depth or none (the pipeline may have dropped it); never another's
        assert f.depth is None if k in missing else (f.depth is None or np.array_equal(f.depth, frames[k][1])), k


def test_db3_realtime_replay_is_paced_and_stamped_on_arrival(tmp_path):
    frames = synthetic_frames(30)
    path = tmp_path / "paced.db3"
    write_db3(path, frames, paced=True)
    got = collect(open_replay(ReplayConfig(str(path), loop=False, realtime=True)))
    # Playback starts while the pipeline spins up, so the first frames may be skipped; the rest arrive
    # in order, exactly, and spread over the recording's duration rather than in one burst.
    assert_exact_in_order(frames, got, min_frames=20)
    order = [match(frames, f)[0] for f in got]
    assert got[-1].timestamp - got[0].timestamp > 0.5 * (order[-1] - order[0]) / 30
    assert all(b.timestamp > a.timestamp for a, b in zip(got, got[1:]))


def test_db3_writer_refuses_other_extensions(tmp_path):
    with pytest.raises(ValueError, match=r"\.db3"):
        DB3Writer(tmp_path / "take.bag", INTR)
    with pytest.raises(ValueError, match="record_to must end in .db3"):
        RealSenseConfig(record_to="x.bag")


def test_image_folder_replay_and_loop(tmp_path):
    frames = write_folder(tmp_path / "seq", 5, fps=50.0)
    got = collect(open_replay(ReplayConfig(str(tmp_path / "seq"), loop=False)))
    assert [match(frames, f) for f in got] == [[k] for k in range(5)]
    assert got[0].intrinsics == INTR
    cam = open_replay(ReplayConfig(str(tmp_path / "seq"), loop=True, realtime=False))
    with cam:
        first = cam.wait_first_frame()
        time.sleep(0.3)
        assert cam.frames_received > 5  # looped past the end
    assert first.color.shape == (48, 64, 3)


def test_image_folder_without_metadata_gets_default_intrinsics(tmp_path):
    from PIL import Image

    (tmp_path / "plain").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "plain" / "a.jpg")
    cam = open_replay(ReplayConfig(str(tmp_path / "plain"), loop=False))
    got = collect(cam)
    assert len(got) == 1 and got[0].depth is None and cam.intrinsics.width == 40


def test_record_from_a_camera_then_replay(tmp_path):
    frames = synthetic_frames(20, seed=3)
    src = tmp_path / "src.db3"
    write_db3(src, frames, paced=True)
    out = tmp_path / "copy.db3"
    with open_replay(ReplayConfig(str(src), loop=False, realtime=True)) as cam:
        cam.wait_first_frame()
        n = record(cam, out, seconds=3.0)
    assert n >= 10
    assert db3_image_counts(out) == {"color": n, "depth": n}
    got = collect(open_replay(ReplayConfig(str(out), loop=False, realtime=False)))
    # Faster than real time, a colour frame whose depth was not read yet comes without depth (README).
    colours = [[k for k, (c, _) in enumerate(frames) if np.array_equal(c, f.color)] for f in got]
    assert got and all(len(i) == 1 for i in colours), colours
    assert all(f.depth is None or np.array_equal(f.depth, frames[i[0]][1]) for i, f in zip(colours, got)), \
        [(i, None if f.depth is None else match(frames, f)) for i, f in zip(colours, got)]
    assert sum(f.depth is not None for f in got) >= len(got) // 2


def test_replay_errors_name_the_problem(tmp_path):
    with pytest.raises(CameraError, match="does not exist"):
        open_replay(ReplayConfig(str(tmp_path / "missing.db3")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="no .png/.jpg"):
        open_replay(ReplayConfig(str(tmp_path / "empty"))).connect()


def test_resolve_serial_messages():
    devs = [RealSenseDevice("111", "Intel RealSense D435", "3.2", "5.16"), RealSenseDevice("222", "Intel RealSense D405", "3.2", "5.16")]
    assert resolve_serial("222", devs) == "222"
    with pytest.raises(CameraError, match="Several RealSense cameras"):
        resolve_serial(None, devs)
    with pytest.raises(CameraError, match="No RealSense camera with serial 333; attached: .*111"):
        resolve_serial("333", devs)
    with pytest.raises(CameraError, match="No RealSense camera found .* udev"):
        resolve_serial(None, [])


def test_no_device_fails_fast_with_the_fix():
    if list_devices():
        pytest.skip("a RealSense camera is attached; the no-device path cannot be exercised")
    t = time.monotonic()
    with pytest.raises(CameraError, match="No RealSense camera found"):
        RealSenseCamera(RealSenseConfig()).connect()
    # Enumeration instead of pipeline.start(): pyrealsense2 would block ~15 s here.
    assert time.monotonic() - t < 5.0


@pytest.mark.hardware
def test_live_realsense_frames_and_recording(tmp_path):
    devs = list_devices()
    if not devs:
        pytest.skip("no RealSense camera attached")
    cam = RealSenseCamera(RealSenseConfig(serial=devs[0].serial, record_to=str(tmp_path / "live.db3")))
    with cam:
        f = cam.wait_first_frame()
        assert f.depth is not None and f.depth.shape == f.color.shape[:2]
        time.sleep(1.0)
    got = collect(open_replay(ReplayConfig(str(tmp_path / "live.db3"), loop=False, realtime=False)))
    assert len(got) > 5


def test_neighbours_stamped_close_together_are_never_paired(tmp_path):
    """A recording of a replay on a busy CPU is stamped on arrival, so frames can lie 5 ms apart:
    before, the pipeline's filler paired colour 2 with depth 3 (within half a period), in 10 of 30
    framesets of every replay faster than real time."""
    frames = synthetic_frames(20, seed=7)
    path = tmp_path / "bursts.db3"
    with DB3Writer(path, INTR, fps=30) as w:
        for k, (c, d) in enumerate(frames):  # in pairs: 5 ms apart, then 61 ms to the next pair
            w.write(c, d, (k // 2) * 0.066 + (k % 2) * 0.005)
            time.sleep(0.005 if k % 2 == 0 else 0.061)
    cam = open_replay(ReplayConfig(str(path), loop=False, realtime=False))
    got = collect(cam)
    colours = [[k for k, (c, _) in enumerate(frames) if np.array_equal(c, f.color)] for f in got]
    assert all(len(i) == 1 for i in colours), colours
    order = [i[0] for i in colours]
    assert order == sorted(set(order)) and len(order) >= 15, order  # each once, in order
    for k, f in zip(order, got):
        assert f.depth is None or np.array_equal(f.depth, frames[k][1]), k  # its own depth or none
    assert sum(f.depth is not None for f in got) >= 15
