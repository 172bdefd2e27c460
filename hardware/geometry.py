"""Rigid-body poses and rotation conversions (numpy only).

Quaternions are ``(x, y, z, w)`` throughout, the order franky's ``Affine.quaternion`` uses, so a
pose read from the arm can be handed back to it without reordering. Euler angles are extrinsic
roll-pitch-yaw about the fixed x, y, z axes (R = Rz(yaw) @ Ry(pitch) @ Rx(roll)), the convention of
the Open-X datasets MolmoAct was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


def quat_normalize(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < _EPS:
        raise ValueError(f"quaternion {q.tolist()} has no direction (norm {n})")
    q = q / n
    # One canonical sign (w >= 0) so that equal rotations compare equal.
    return -q if q[3] < 0 else q


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = quat_normalize(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    # Shepperd's method: pick the largest pivot to stay accurate near 180 degree rotations.
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    return quat_normalize(np.array(q))


def rotvec_to_quat(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < _EPS:
        return np.array([0.0, 0.0, 0.0, 1.0])
    axis = v / angle
    return quat_normalize(np.concatenate([axis * np.sin(angle / 2), [np.cos(angle / 2)]]))


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    x, y, z, w = quat_normalize(q)
    s = np.sqrt(x * x + y * y + z * z)
    if s < _EPS:
        return np.zeros(3)
    angle = 2.0 * np.arctan2(s, w)
    return np.array([x, y, z]) / s * angle


def euler_xyz_to_quat(rpy: np.ndarray) -> np.ndarray:
    r, p, y = (float(a) for a in rpy)
    qx = np.array([np.sin(r / 2), 0.0, 0.0, np.cos(r / 2)])
    qy = np.array([0.0, np.sin(p / 2), 0.0, np.cos(p / 2)])
    qz = np.array([0.0, 0.0, np.sin(y / 2), np.cos(y / 2)])
    return quat_normalize(quat_multiply(qz, quat_multiply(qy, qx)))


def quat_to_euler_xyz(q: np.ndarray) -> np.ndarray:
    m = quat_to_matrix(q)
    pitch = np.arcsin(np.clip(-m[2, 0], -1.0, 1.0))
    roll = np.arctan2(m[2, 1], m[2, 2])
    yaw = np.arctan2(m[1, 0], m[0, 0])
    return np.array([roll, pitch, yaw])


def quat_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The rotation angle (radians, in [0, pi]) that takes orientation a to orientation b."""
    d = abs(float(np.dot(quat_normalize(a), quat_normalize(b))))
    return 2.0 * float(np.arccos(min(1.0, d)))


def quat_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a, b = quat_normalize(a), quat_normalize(b)
    d = float(np.dot(a, b))
    if d < 0:  # take the short way round
        b, d = -b, -d
    if d > 0.9995:
        return quat_normalize(a + t * (b - a))
    theta = np.arccos(d)
    return quat_normalize((np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta))


@dataclass(frozen=True)
class Pose:
    """An end-effector pose in the robot base frame: position (m) and quaternion (x, y, z, w)."""

    position: tuple[float, float, float]
    quaternion: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        p = np.asarray(self.position, dtype=np.float64)
        q = np.asarray(self.quaternion, dtype=np.float64)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise ValueError(f"Pose.position must be 3 finite numbers, got {self.position!r}")
        if q.shape != (4,) or not np.all(np.isfinite(q)):
            raise ValueError(f"Pose.quaternion must be 4 finite numbers (x, y, z, w), got {self.quaternion!r}")
        object.__setattr__(self, "position", tuple(float(v) for v in p))
        object.__setattr__(self, "quaternion", tuple(float(v) for v in quat_normalize(q)))

    @property
    def p(self) -> np.ndarray:
        return np.array(self.position)

    @property
    def q(self) -> np.ndarray:
        return np.array(self.quaternion)

    def matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = quat_to_matrix(self.q)
        m[:3, 3] = self.p
        return m

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> Pose:
        m = np.asarray(m, dtype=np.float64)
        return cls(tuple(m[:3, 3]), tuple(matrix_to_quat(m[:3, :3])))

    def compose(self, other: Pose) -> Pose:
        """self * other: `other` expressed in self's frame, returned in self's parent frame."""
        return Pose(
            tuple(self.p + quat_to_matrix(self.q) @ other.p),
            tuple(quat_multiply(self.q, other.q)),
        )

    def distance(self, other: Pose) -> tuple[float, float]:
        """(translation distance in m, rotation angle in rad) between two poses."""
        return float(np.linalg.norm(self.p - other.p)), quat_angle(self.q, other.q)

    def to_dict(self) -> dict:
        return {"p": [round(v, 6) for v in self.position], "q": [round(v, 6) for v in self.quaternion]}
