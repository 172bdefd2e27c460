"""The robot control side (no torch): policy contract and worker, executor, safety, action
conventions, the control loop and its log. It reaches the engine only through
runtime/molmoact_policy.py."""
