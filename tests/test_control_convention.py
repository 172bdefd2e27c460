"""Each action-convention transform, checked against hand-computed poses."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact_edge.hardware.geometry import (
    Pose,
    euler_xyz_to_quat,
    matrix_to_quat,
    quat_angle,
    quat_multiply,
    quat_to_euler_xyz,
    quat_to_matrix,
    quat_to_rotvec,
    rotvec_to_quat,
)
from molmoact_edge.runtime.control.convention import CONVENTIONS, ActionConvention, convention_for

# The sim's home pose: gripper pointing down (180 degrees about x).
DOWN = Pose((0.5, 0.0, 0.4), (1.0, 0.0, 0.0, 0.0))


def rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_euler_is_extrinsic_xyz():
    r, p, y = 0.3, -0.2, 0.5
    cx, sx, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    np.testing.assert_allclose(quat_to_matrix(euler_xyz_to_quat([r, p, y])), rz(y) @ ry @ rx, atol=1e-12)
    np.testing.assert_allclose(quat_to_euler_xyz(euler_xyz_to_quat([r, p, y])), [r, p, y], atol=1e-12)


def test_rotvec_and_matrix_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(50):
        v = rng.normal(size=3)
        v *= rng.uniform(0, np.pi - 1e-3) / np.linalg.norm(v)
        q = rotvec_to_quat(v)
        np.testing.assert_allclose(quat_to_rotvec(q), v, atol=1e-9)
        assert quat_angle(matrix_to_quat(quat_to_matrix(q)), q) < 1e-7


def test_zero_action_keeps_pose_and_translation_is_base_frame():
    conv = ActionConvention()
    same = conv.apply(DOWN, np.zeros(7))
    assert same.distance(DOWN) == pytest.approx((0.0, 0.0), abs=1e-12)
    moved = conv.apply(DOWN, np.array([0.01, -0.02, 0.03, 0, 0, 0, 1]))
    np.testing.assert_allclose(moved.p, DOWN.p + [0.01, -0.02, 0.03], atol=1e-12)


def test_base_vs_ee_frame_translation():
    # With the gripper pointing down, EE +z is base -z and EE +y is base -y.
    ee = ActionConvention(delta_frame="ee").apply(DOWN, np.array([0, 0.01, 0.02, 0, 0, 0, 1]))
    np.testing.assert_allclose(ee.p, DOWN.p + [0, -0.01, -0.02], atol=1e-12)


def test_base_frame_rotation_premultiplies_and_ee_frame_postmultiplies():
    yaw = np.array([0, 0, 0, 0, 0, 0.3, 1])
    base = ActionConvention(delta_frame="base").apply(DOWN, yaw)
    ee = ActionConvention(delta_frame="ee").apply(DOWN, yaw)
    R = quat_to_matrix(DOWN.q)
    np.testing.assert_allclose(quat_to_matrix(base.q), rz(0.3) @ R, atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(ee.q), R @ rz(0.3), atol=1e-12)
    # Pointing down, a yaw about base z and about EE z turn opposite ways.
    assert quat_angle(base.q, ee.q) == pytest.approx(0.6, abs=1e-9)


def test_rotvec_convention_and_scales():
    conv = ActionConvention(rotation="rotvec", translation_scale=0.05, rotation_scale=0.5)
    out = conv.apply(DOWN, np.array([1.0, 0, 0, 0, 0, 1.0, 1]))
    np.testing.assert_allclose(out.p, DOWN.p + [0.05, 0, 0], atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(out.q), rz(0.5) @ quat_to_matrix(DOWN.q), atol=1e-12)
    none = ActionConvention(rotation="none").apply(DOWN, np.array([0, 0, 0, 1.0, 1.0, 1.0, 1]))
    assert quat_angle(none.q, DOWN.q) < 1e-12


def test_chunk_targets_chain_from_the_anchor():
    conv = ActionConvention()
    actions = np.array([[0.01, 0, 0, 0, 0, 0.1, 1]] * 3)
    t = conv.targets(DOWN, actions)
    np.testing.assert_allclose(t[-1].p, DOWN.p + [0.03, 0, 0], atol=1e-12)
    expected = quat_multiply(euler_xyz_to_quat([0, 0, 0.3]), DOWN.q)
    assert quat_angle(t[-1].q, expected) < 1e-9


@pytest.mark.parametrize("sign,value,closed", [
    ("open_positive", 1.0, 0.0), ("open_positive", 0.0, 1.0), ("open_positive", 0.25, 0.75),
    ("close_positive", 1.0, 1.0), ("close_positive", 0.0, 0.0),
])
def test_gripper_sign(sign, value, closed):
    assert ActionConvention(gripper=sign).closedness(value) == pytest.approx(closed)


def test_gripper_range_normalised_and_clipped():
    conv = ActionConvention(gripper="close_positive", gripper_low=-1.0, gripper_high=1.0)
    assert conv.closedness(-1.0) == 0.0 and conv.closedness(1.0) == 1.0 and conv.closedness(0.0) == 0.5
    assert conv.closedness(7.0) == 1.0


def test_presets_cover_released_unnorm_keys():
    for key in ("molmoact", "fractal20220817_data", "bridge_orig", "libero_spatial_no_noops_modified",
                "libero_object_no_noops_modified", "libero_goal_no_noops_modified", "libero_10_no_noops_modified"):
        assert key in CONVENTIONS
    assert convention_for("bridge_orig").control_period_s == pytest.approx(0.2)
    assert convention_for("libero_10_no_noops_modified").rotation == "rotvec"
    with pytest.raises(ValueError, match="no action convention for unnorm key 'nope'"):
        convention_for("nope")


@pytest.mark.parametrize("field,value,match", [
    ("delta_frame", "tool", "delta_frame must be one of"),
    ("rotation", "quat", "rotation must be one of"),
    ("gripper", "inverted", "gripper must be one of"),
    ("control_period_s", 0.0, "control_period_s"),
    ("action_dim", 8, "action_dim"),
])
def test_convention_validation_names_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ActionConvention(**{field: value})
