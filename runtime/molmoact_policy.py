"""The MolmoAct policy: camera frames + instruction -> an action chunk, through a bundle.

Each prediction runs one grammar-constrained step on the bundle (onnxruntime), so the answer is
always parseable; the parsed, de-normalised actions are returned in the unnorm key's action
convention. A step without an action (an answer the grammar could not finish within the token
budget) or with NaN/inf in the model (NonFiniteError) returns no chunk: it is raised, and the
control loop treats it like any policy error (the arm stops and the run ends).

Consecutive frames see nearly the same scene, so each step is drafted from the previous step's
answer (speculative decoding, on by default): the answer is exactly what plain greedy decoding
gives, in fewer sequential LLM forwards. ``step_info`` carries the counts into the run log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from molmoact_edge.runtime.control.convention import ActionConvention, convention_for
from molmoact_edge.runtime.control.policy import Observation
from molmoact_edge.runtime.engine.pipeline import open_bundle


class NoActionError(RuntimeError):
    """The model's answer held no action (token budget exhausted before the action lists)."""


@dataclass(frozen=True)
class MolmoActConfig:
    """How to run MolmoAct as a policy. ``unnorm_key`` selects both the de-normalisation statistics
    and the robot-side action convention; ``None`` is allowed when the bundle has one key."""

    bundle: str
    unnorm_key: str | None = None
    template: str | None = None  # default: single view for one camera, multi view for several
    max_new_tokens: int = 512  # official: 256 for one action, 512 for 8-action chunks
    max_actions: int = 8
    threads: int | None = None
    verify_hashes: bool = True
    bundle_sha256: str | None = None  # the manifest's pinned sha256 (run --bundle-sha256)
    # The robot-side action convention to use, by preset name (runtime/control/convention.py); default: the
    # unnorm key's own preset. Needed for checkpoints whose dataset has no preset yet.
    convention: str | None = None
    draft: bool = True  # draft each step from the previous answer (run --no-draft turns it off)

    def __post_init__(self):
        if not Path(self.bundle).is_dir():
            raise ValueError(f"MolmoActConfig.bundle: {self.bundle} is not a directory; export one with "
                             "`molmoact-edge export --checkpoint CHECKPOINT --out BUNDLE`")
        if self.max_new_tokens < 150:
            raise ValueError(f"MolmoActConfig.max_new_tokens must be >= 150 to fit one answer, got {self.max_new_tokens}")
        if not 1 <= self.max_actions <= 64:
            raise ValueError(f"MolmoActConfig.max_actions must be in [1, 64], got {self.max_actions}")
        if self.template not in (None, "single", "multi"):
            raise ValueError(f"MolmoActConfig.template must be single, multi or None, got {self.template!r}")


class MolmoActPolicy:
    def __init__(self, config: MolmoActConfig):
        self.config = config
        self.pipe = open_bundle(config.bundle, verify_hashes=config.verify_hashes, bundle_sha256=config.bundle_sha256,
                                threads=config.threads)
        # a robot needs real units: the key must resolve (the only one, or the one chosen)
        key = self.pipe.spec.config.resolve_unnorm_key(config.unnorm_key)
        self.unnorm_key = key
        self.decoder = self.pipe.reading(key).decoder
        self.grammar = self.pipe.grammar(key, config.max_actions)  # built now, not on the first frame
        self.convention: ActionConvention = convention_for(config.convention or key)
        self.last_step = None

    def predict(self, obs: Observation) -> np.ndarray:
        images = [f.color for f in obs.frames]
        previous = self.last_step.token_ids if self.config.draft and self.last_step is not None else None
        res = self.pipe.act(images, obs.instruction, template=self.config.template,
                            max_new_tokens=self.config.max_new_tokens, max_actions=self.config.max_actions,
                            unnorm_key=self.unnorm_key, draft_from=previous)
        self.last_step = res
        if res.actions.shape[0] == 0:
            raise NoActionError(f"MolmoAct produced no action in {len(res.token_ids)} tokens "
                                f"({'; '.join(res.parse_errors)}); raise max_new_tokens")
        return res.actions

    @property
    def step_info(self) -> dict:
        """How the last step decoded: sequential LLM forwards, new tokens and the draft counts
        (in all and per segment kind), for the run log."""
        if self.last_step is None:
            return {}
        r = self.last_step.generation
        return {"llm_forwards": r.forwards, "new_tokens": len(r.token_ids), "draft_tokens": r.drafts.draft_tokens,
                "accepted_tokens": r.drafts.accepted_tokens, "draft_segments": r.drafts.to_dict()}

    def close(self) -> None:
        self.pipe.close()
