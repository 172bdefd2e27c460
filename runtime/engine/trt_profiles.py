"""TensorRT optimisation profiles for a bundle's graphs: which token counts each engine profile
serves, and the input shapes (min, opt, max) that follow from the graph's named dimensions.

LLM profiles (over ``llm_static``: whole cache in, so ``max_seq_len`` is fixed per engine):
- ``decode``: q = 1, one logits row: the step that is captured in a CUDA graph and replayed;
- ``verify``: q = 2..K (drafts to verify, grammar-forced spans), up to K logits rows;
- ``prefill``: q = K+1..max_seq_len (the prompt), logits rows up to q.
Pure logic (no TensorRT): the builder applies these, the backend picks a profile by q with them.
"""

from __future__ import annotations

from dataclasses import dataclass

LLM_GRAPH = "llm_static"


@dataclass(frozen=True)
class Profile:
    name: str
    dims: dict[str, tuple[int, int, int]]  # dimension name -> (min, opt, max)

    def serves(self, q: int) -> bool:
        lo, _, hi = self.dims["q"]
        return lo <= q <= hi

    def shapes(self, inputs) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of each graph input, from its dims (ints or names of ``dims``)."""
        out = {}
        for t in inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue  # a static input needs no profile entry
            missing = [d for d in t.shape if isinstance(d, str) and d not in self.dims]
            if missing:
                raise ValueError(f"profile {self.name!r} does not set dimension(s) {missing} of input {t.name!r}")
            out[t.name] = tuple(tuple(d if isinstance(d, int) else self.dims[d][k] for d in t.shape) for k in range(3))
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()}}


def llm_profiles(max_seq_len: int, max_verify: int) -> list[Profile]:
    if max_verify < 2:
        raise ValueError(f"--max-verify must be >= 2 (the largest k of a verification or forced span), got {max_verify}")
    if max_seq_len <= max_verify + 1:
        raise ValueError(f"--max-seq-len {max_seq_len} must exceed --max-verify + 1 ({max_verify + 1}): the prefill "
                         "profile starts above the verification one")
    n, k = max_seq_len, max_verify
    fixed = (n, n, n)
    return [Profile("decode", {"q": (1, 1, 1), "rows": (1, 1, 1), "max_seq_len": fixed}),
            Profile("verify", {"q": (2, k, k), "rows": (1, k, k), "max_seq_len": fixed}),
            Profile("prefill", {"q": (k + 1, min(256, n), n), "rows": (1, 1, n), "max_seq_len": fixed})]


def vision_profiles(max_crops: int = 9, max_tokens: int = 2048) -> list[Profile]:
    """One profile: a step's crops (1 + up to 8 tiles, times images) and its pooled tokens."""
    return [Profile("vision", {"crops": (1, min(5, max_crops), max_crops), "tokens": (1, min(512, max_tokens), max_tokens)})]


def profile_for(profiles: list[Profile], q: int) -> int:
    """Index of the profile that serves q tokens."""
    for i, p in enumerate(profiles):
        if p.serves(q):
            return i
    served = ", ".join(f"{p.name} q={p.dims['q'][0]}..{p.dims['q'][2]}" for p in profiles)
    raise ValueError(f"no engine profile serves {q} tokens ({served}); rebuild with a larger --max-seq-len")
