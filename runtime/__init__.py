"""The robot runtime (no torch): contracts shared with export/, the decode loop, the policy, the control loop."""
