"""franky-sim run as a Franka behaves toward libfranka: `python -m molmoact_edge.hardware.sim_launch [franky-sim args]`.

franky plans a streamed motion from what the controller reports, and franky-sim 1.0.4 reports it
differently from a Franka in two ways that together make franky's command run away (measured: 0.9-1.2
rad/s commanded while its planner's limit was 0.25 rad/s; the driver's runaway check stops the run):

- **It steps whether or not libfranka answered.** A Franka's client answers every 1 ms state within
  the cycle (a real-time thread). franky-sim steps regardless, so on a busy machine commands miss
  steps and libfranka misses states. Then franky extrapolates the gap from the reported motion,
  libfranka's command filter works against a stale reported command, and franky-sim holds the old
  command: the guesses disagree and the command jumps, feeding the next guess. `lockstep` makes a
  step wait (during a motion, at most `LOCKSTEP_WAIT_S`) for libfranka's next command; the simulated
  clock slows down instead (the driver measures and reports its rate).
- **It reports the commanded twist and acceleration late.** franky restarts its planner from them at
  every replaced motion (every streamed target). franky-sim reports them through low-pass filters
  (about 20 ms behind; the acceleration from the inverse-kinematics joint targets, filtered twice), so
  the velocity the planner braked away comes back at each restart. `exact_commanded_derivatives`
  reports the planner's own 1 ms differences, and the command itself as the desired pose.

A drill that streams rotations around the gripper-down pose (tests/test_sim_model_loop.py) ran away
2 of 2 times on franky-sim as shipped, 2 of 2 with only the second fix, 0 of 2 with only the first
and 0 of 3 with both (load 20-22). When the machine starves the simulator so far that the wait runs out
(controller clock 0.03-0.06x real time), the runaway can come back. The patch reaches into franky-sim's
private attributes and checks them at start-up: written for franky-sim 1.0.4.
"""

from __future__ import annotations

import select
import sys
import time

# How long a simulator step waits for libfranka's next command (host seconds): a short stall of the
# client is waited out, a long one (or a client gone) lets the simulator go on as before.
LOCKSTEP_WAIT_S = 0.05

# franky-sim's private layout this patch relies on (checked at start-up, so a new release that moves
# it fails loudly here instead of silently reporting lagged estimates again).
_COMPONENTS = ("O_T_EE_d", "O_dP_EE_d", "O_T_EE_c", "O_dP_EE_c", "O_ddP_EE_c")


class CommandedDerivatives:
    """The twist and acceleration of franky's planner, recovered from the commanded poses.

    Takes the place of franky-sim's `PoseDerivativeTracker` on `O_T_EE_c` (same call and
    `last_derivative`). A command is stamped with the id of the state it answers (libfranka's clock:
    one id per millisecond), not with the step it arrived in, which jitters on a busy machine. Only
    commands answering consecutive states are differentiated: between those franky's planner advanced
    exactly 1 ms. A command sent after missed states also carries franky's extrapolation of the gap,
    which franky computes from the reported twist; differentiating it would feed the estimate back
    into itself (measured: the command pumped to 1.2 rad/s while the planner's limit was 0.25). Across
    such a gap the last exact values are kept."""

    STEP_S = 1e-3

    def __init__(self, command_id=lambda: 0) -> None:
        import numpy as np

        self._np = np
        self._command_id = command_id  # id of the command being applied, 0 when none
        self._last = None  # (stamp kind, seconds, pose) of the last observed command
        self._twist_at = None  # stamp of the command whose 1 ms difference gave `twist`
        self.twist = np.zeros(6)
        self.acceleration = np.zeros(6)

    def __call__(self, t: float, pose):
        import pinocchio as pin

        np = self._np
        if pose is None:
            self.clear()
            return self.twist
        mid = self._command_id()
        kind, stamp = ("command", mid * 1e-3) if mid > 0 else ("step", t)
        last = self._last
        if last is not None and last[0] == kind and abs(stamp - last[1]) < 1e-6:
            return self.twist  # the same command again: nothing new
        if last is not None and last[0] == kind and abs(stamp - last[1] - self.STEP_S) < 1e-6:
            twist = np.concatenate([(pose.translation - last[2].translation) / self.STEP_S,
                                    pin.log3(pose.rotation @ last[2].rotation.T) / self.STEP_S])
            if self._twist_at is not None and abs(last[1] - self._twist_at) < 1e-6:
                self.acceleration = (twist - self.twist) / self.STEP_S
            self.twist, self._twist_at = twist, stamp
        self._last = (kind, stamp, pose.copy())
        return self.twist

    update = __call__

    def clear(self) -> None:
        self._last = self._twist_at = None
        self.twist, self.acceleration = self._np.zeros(6), self._np.zeros(6)

    @property
    def last_derivative(self):
        return self.twist


def _command_id(robot):
    def current() -> int:
        server = robot.server
        command = getattr(server, "_FrankaRobotServer__current_control_command", None) if server else None
        return int(getattr(command, "message_id", 0) or 0)

    return current


def exact_commanded_derivatives(robot) -> None:
    """Make one franky-sim robot report the commanded pose, twist and acceleration as a Franka does."""
    sc = getattr(robot, "_tracked_state_components", None)
    slot = "_TrackedStateComponent__default_value"  # a component's default, name-mangled
    explicit = "_TrackedStateComponent__explicit_value"
    if not isinstance(sc, dict) or any(k not in sc for k in _COMPONENTS) \
            or not all(hasattr(sc[k], slot) and hasattr(sc[k], explicit) for k in _COMPONENTS):
        raise RuntimeError("franky-sim's state layout changed (tracked components "
                           f"{_COMPONENTS}); this patch was written for franky-sim 1.0.4: pin that version")
    tracker = CommandedDerivatives(_command_id(robot))
    original = {k: getattr(sc[k], slot) for k in _COMPONENTS}
    velocity_fd = sc["O_dP_EE_c"].observers["fd"]

    def commanded(time):
        """The pose commanded for this step (Cartesian pose control), else None."""
        c = sc["O_T_EE_c"]
        return getattr(c, explicit) if c.has_explicit_value(time) else None

    def pose_d(time, state):
        # The motion generator's desired pose is the command itself; franky-sim reports the pose of
        # its inverse-kinematics solution, which trails the command.
        pose = commanded(time)
        return pose if pose is not None else original["O_T_EE_d"](time, state)

    def twist_d(time, state):
        pose = commanded(time)
        return tracker(time, pose) if pose is not None else original["O_dP_EE_d"](time, state)

    def acceleration_c(time, state):
        if sc["O_dP_EE_c"].has_explicit_value(time):  # velocity control: franky-sim's own, unchanged
            return velocity_fd.last_derivative
        if commanded(time) is not None:
            return tracker.acceleration
        return original["O_ddP_EE_c"](time, state)

    sc["O_T_EE_c"].observers["fd"] = tracker  # O_dP_EE_c reads the commanded twist from here
    setattr(sc["O_T_EE_d"], slot, pose_d)
    setattr(sc["O_dP_EE_d"], slot, twist_d)
    setattr(sc["O_ddP_EE_c"], slot, acceleration_c)


def lockstep(server_class, wait_s: float = LOCKSTEP_WAIT_S) -> None:
    """Make franky-sim's robot server wait, during a motion, for libfranka's next command before a step.

    A Franka's client answers every state within its 1 ms cycle (a real-time thread; a late one is a
    communication reflex). franky-sim steps on whether or not the answer came, so on a busy machine
    commands miss steps and libfranka misses states. Both sides then guess: franky extrapolates the
    gap from the reported motion and filters against a stale reported command, franky-sim holds the
    old command. The guesses do not match and the command jumps. Waiting keeps the two in step; the
    simulated clock slows down instead (the driver reports that rate). After `wait_s` of host time
    without an answer the step goes ahead as before, so a client that died does not freeze the
    simulator."""
    original = server_class._process_udp_commands
    if getattr(original, "_lockstep", False):
        return

    def _process_udp_commands(self):
        original(self)
        try:
            answered = self._FrankaRobotServer__has_new_command  # set by every command received this step
            sock = self._FrankaServer__udp_socket
            # A motion starts with states only: libfranka answers once the state shows the motion.
            started = self._FrankaRobotServer__current_control_command.message_id > 0
        except AttributeError as e:
            raise RuntimeError(f"franky-sim's server changed ({e}); this patch was written for franky-sim 1.0.4") from e
        deadline = time.monotonic() + wait_s
        while self.current_motion_id and started and not answered:
            left = deadline - time.monotonic()
            if left <= 0 or sock is None or not select.select([sock], [], [], left)[0]:
                return
            original(self)
            answered = self._FrankaRobotServer__has_new_command

    _process_udp_commands._lockstep = True
    server_class._process_udp_commands = _process_udp_commands


def install() -> None:
    """Patch franky-sim in this process: every robot it creates, and its robot server."""
    import franky_sim.base_simulator as bs
    from franky_sim.franka_robot_server import FrankaRobotServer

    lockstep(FrankaRobotServer)
    original = bs.BaseRobot.__init__
    if getattr(original, "_exact_commanded", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        exact_commanded_derivatives(self)

    __init__._exact_commanded = True
    bs.BaseRobot.__init__ = __init__


def install_trace(path: str) -> None:
    """Write one JSON line per simulated step of Cartesian pose control: simulated time, joint
    positions and velocities, the inverse-kinematics joint target, the commanded pose (x, y, z, qx,
    qy, qz, qw) and the commanded twist reported to libfranka. For diagnosis (README, "Streaming
    targets"): a few hundred bytes per step, so minutes of motion are tens of MB."""
    import json

    import franky_sim.base_simulator as bs
    import numpy as np

    out = open(path, "w", buffering=1)  # noqa: SIM115  (open for the life of the process)
    cartesian, joint = bs.BaseRobot.cartesian_position_control, bs.BaseRobot.joint_position_control
    pending: dict = {}

    def cartesian_position_control(self, target_pose, target_elbow_config, has_new_command=True):
        pending["pose"] = [round(float(v), 6) for v in target_pose]
        return cartesian(self, target_pose, target_elbow_config, has_new_command)

    def joint_position_control(self, target_q, has_new_command=True):
        result = joint(self, target_q, has_new_command)
        pose = pending.pop("pose", None)
        if pose is not None:
            s = self._get_state()
            tracker = self._tracked_state_components["O_T_EE_c"].observers.get("fd")
            out.write(json.dumps({
                "t": round(float(self._BaseRobot__t), 4), "q": np.round(np.asarray(s.q, float), 5).tolist(),
                "dq": np.round(np.asarray(s.dq, float), 4).tolist(),
                "q_ik": np.round(np.asarray(target_q, float), 5).tolist(), "pose_c": pose,
                "twist_c": np.round(np.asarray(getattr(tracker, "twist", np.zeros(6)), float), 5).tolist(),
            }) + "\n")
        return result

    bs.BaseRobot.cartesian_position_control = cartesian_position_control
    bs.BaseRobot.joint_position_control = joint_position_control


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    install()
    if "--trace" in args:  # ours, not franky-sim's: taken out before franky-sim parses the rest
        i = args.index("--trace")
        if i + 1 >= len(args):
            raise SystemExit("sim_launch: --trace needs a file path")
        install_trace(args[i + 1])
        del args[i:i + 2]
    from franky_sim.run_server import main as run_server

    sys.argv = [sys.argv[0]] + args
    run_server()


if __name__ == "__main__":
    main()
