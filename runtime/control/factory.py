"""Build a policy from its picklable spec: the one place that knows every policy kind.

Kept apart from policy.py (the contract) because the "molmoact" kind brings the engine through the
bridge (runtime/molmoact_policy.py), which itself imports the contract: one module holding both would
be an import cycle.
"""

from __future__ import annotations

from molmoact_edge.runtime.control.policy import (
    DrillPolicy,
    Policy,
    PolicySpec,
    PolicyUnavailable,
    ScriptedPolicy,
)


def build_policy(spec: PolicySpec) -> Policy:
    if spec.kind == "molmoact":
        # Imported here: it brings the decode loop and onnxruntime, which scripted bring-up never needs.
        from molmoact_edge.runtime.molmoact_policy import MolmoActConfig, MolmoActPolicy

        try:
            config = MolmoActConfig(**spec.options)
        except TypeError as e:
            raise PolicyUnavailable(f"bad MolmoAct policy options {sorted(spec.options)}: {e}") from None
        policy: Policy = MolmoActPolicy(config)
    elif spec.kind == "expert":
        from molmoact_edge.runtime.control.expert import ExpertConfig, ExpertPolicy

        try:
            policy = ExpertPolicy(ExpertConfig(**spec.options))
        except TypeError as e:
            raise PolicyUnavailable(f"bad expert policy options {sorted(spec.options)}: {e}") from None
    else:
        policy = ScriptedPolicy(spec.scripted)
    if spec.drill.kind != "none":
        policy = DrillPolicy(policy, spec.drill)
    return policy
