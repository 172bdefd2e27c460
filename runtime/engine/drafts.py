"""Drafts for speculative decoding: cheap guesses of the next tokens, verified by the model.

A robot asks the same question many times a second about nearly the same scene, so the previous
step's answer is a good guess of this one: the 100 depth codes, the trace and the actions change
little from frame to frame. The decode loop (runtime/engine/generate.py) scores k drafted tokens in
one multi-token forward and keeps the longest prefix equal to its own greedy choice, so a draft
only ever saves forwards; it never changes the answer.

Alignment by output segment. An answer is cut into segments: the glue text, the depth block, each
trace point and each action list (a token that opens a bracket, ``<DEPTH_START>`` and
``<DEPTH_END>`` start one; a token that closes the last open bracket starts glue). Each segment has
a key, its kind and its ordinal among that kind (``("action", 2)`` is the third action). The
previous answer is drafted from the same key at the same offset, so a trace with one more digit or
one point fewer does not spoil the actions after it: the alignment restarts at the next segment.
Nothing here needs the grammar (``--no-grammar`` drafts the same way) and nothing needs torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

KINDS = ("text", "depth", "trace", "action")


class SegmentTable:
    """Per token id: how many brackets its text opens and closes (from the tokenizer, once)."""

    def __init__(self, opens: np.ndarray, closes: np.ndarray, depth_start: int, depth_end: int):
        self.opens, self.closes = opens, closes
        self.depth_start, self.depth_end = int(depth_start), int(depth_end)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SegmentTable:
        vocab = tokenizer.rust.get_vocab(with_added_tokens=True)
        size = max(len(tokenizer), max(vocab.values()) + 1)
        opens = np.zeros(size, dtype=np.int8)
        closes = np.zeros(size, dtype=np.int8)
        for text, i in vocab.items():
            # byte-level BPE spells printable ASCII as itself, so counting characters is exact
            if "[" in text or "]" in text:
                opens[i], closes[i] = min(text.count("["), 100), min(text.count("]"), 100)
        sp = tokenizer.special
        return cls(opens, closes, sp.depth_start, sp.depth_end)

    def segments(self, ids: Sequence[int]) -> dict[tuple, int]:
        """Where each segment of an answer starts: key -> index into ``ids``."""
        cur, starts = SegmentCursor(self), {}
        for i, t in enumerate(ids):
            if cur.advance(int(t)):
                starts.setdefault(cur.key, i)
        return starts


class SegmentCursor:
    """Which segment an answer is in, and how far into it, token by token."""

    def __init__(self, table: SegmentTable):
        self.t = table
        self.depth = 0  # open brackets
        self.groups = 0  # bracket groups opened at depth 0: the first is the trace, later ones actions
        self.counts = dict.fromkeys(KINDS, 0)
        self.key: tuple = ("text", None)  # glue is keyed by the segment it follows
        self.offset = 0  # tokens of the current segment so far
        self._last_bracket: tuple | None = None

    def copy(self) -> SegmentCursor:
        c = copy.copy(self)
        c.counts = dict(self.counts)
        return c

    @property
    def kind(self) -> str:
        return self.key[0]

    def _next(self, token: int) -> tuple[tuple | None, int, bool]:
        """(the key of the segment ``token`` starts, or None if it continues this one; the depth
        after it; whether it opens a new bracket group)."""
        t = self.t
        if token == t.depth_start:
            return ("depth", self.counts["depth"]), self.depth, False
        if token == t.depth_end:
            return ("text", ("depth", self.counts["depth"] - 1)), self.depth, False
        o = c = 0
        if 0 <= token < len(t.opens):
            o, c = int(t.opens[token]), int(t.closes[token])
        depth = max(0, self.depth - c)
        if o:
            group = depth == 0
            kind = "trace" if self.groups + group <= 1 else "action"
            return (kind, self.counts[kind]), depth + o, group
        if c and depth == 0 and self.depth > 0:
            return ("text", self._last_bracket), 0, False
        return None, depth, False

    def kind_of(self, token: int) -> str:
        """The kind of segment ``token`` would belong to if it came next."""
        key = self._next(token)[0]
        return (key or self.key)[0]

    def advance(self, token: int) -> bool:
        """Consume one token; True when it starts a new segment."""
        key, depth, group = self._next(token)
        self.depth = depth
        if key is None:
            self.offset += 1
            return False
        self.groups += group
        self.counts[key[0]] += 1
        if key[0] in ("trace", "action"):
            self._last_bracket = key
        self.key, self.offset = key, 1
        return True


class DraftSource(Protocol):
    """Guesses the tokens after ``answer`` (the tokens so far, ``cursor`` its segment state)."""

    def propose(self, answer: Sequence[int], cursor: SegmentCursor, n: int) -> list[int]: ...


class PreviousAnswer:
    """The previous step's answer, drafted from the same segment at the same offset."""

    name = "previous"

    def __init__(self, table: SegmentTable, previous: Sequence[int]):
        self.ids = [int(t) for t in previous]
        bad = [t for t in self.ids if not 0 <= t < len(table.opens)]
        if bad:
            raise ValueError(f"the draft holds token ids outside this tokenizer's range [0, {len(table.opens)}): "
                             f"{bad[:5]}; draft from an answer of the same model")
        self.starts = table.segments(self.ids)
        self.starts[("text", None)] = 0  # the glue before the first segment starts the answer

    def propose(self, answer: Sequence[int], cursor: SegmentCursor, n: int) -> list[int]:
        start = self.starts.get(cursor.key)
        if start is None:
            return []
        p = start + cursor.offset
        # the current segment ran longer than the previous one: nothing aligned to offer until the
        # next segment starts (the alignment restarts there)
        nxt = self._end(start)
        if p > nxt:
            return []
        return self.ids[p:p + n]

    def _end(self, start: int) -> int:
        later = [s for s in self.starts.values() if s > start]
        return min(later) if later else len(self.ids)


class NgramLookup:
    """Prompt-lookup style: the tokens that followed the last earlier occurrence of the answer's
    final ``n`` tokens (n from ``max_n`` down to ``min_n``), within the answer itself."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramLookup needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, answer: Sequence[int], cursor: SegmentCursor, n: int) -> list[int]:
        a = list(answer)
        for m in range(self.max_n, self.min_n - 1, -1):
            if len(a) <= m:
                continue
            tail = a[-m:]
            for j in range(len(a) - m - 1, -1, -1):  # newest earlier occurrence first
                if a[j:j + m] == tail:
                    return a[j + m:j + m + n]
        return []


@dataclass
class DraftStats:
    """Drafted and accepted tokens, in all and per segment kind."""

    drafted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    accepted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def draft_tokens(self) -> int:
        return sum(self.drafted.values())

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted.values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"draft_tokens": self.drafted[k], "accepted_tokens": self.accepted[k]} for k in KINDS}


class Drafter:
    """The draft policy of one generation: its sources (first non-empty proposal wins) and the
    adaptive draft length k.

    k doubles after a fully accepted draft (up to ``max_k``) and falls back to twice the accepted
    length after a rejection (at least ``min_k``): a draft that keeps matching grows fast, one that
    keeps failing costs few extra rows. ``max_k`` bounds the verification forward: on a
    bandwidth-bound GPU up to a few dozen tokens cost about one token, on a CPU cost grows with k
    (benchmarks/spec_decode.py measures the curve)."""

    def __init__(self, table: SegmentTable, sources: Sequence[DraftSource], k: int = 8, min_k: int = 2,
                 max_k: int = 32):
        if not 1 <= min_k <= k <= max_k:
            raise ValueError(f"draft lengths need 1 <= min_k <= k <= max_k, got {min_k}, {k}, {max_k}")
        self.table, self.sources = table, list(sources)
        self.k, self.min_k, self.max_k = k, min_k, max_k
        self.stats = DraftStats()
        self._used: DraftSource | None = None  # the source of the last proposal
        self._failed: DraftSource | None = None  # ... if nothing of it was accepted

    @classmethod
    def from_previous(cls, table: SegmentTable, previous: Sequence[int] | None, ngram: bool = False,
                      **options) -> Drafter:
        sources: list[DraftSource] = []
        if previous:
            sources.append(PreviousAnswer(table, previous))
        if ngram:
            sources.append(NgramLookup())
        return cls(table, sources, **options)

    def cursor(self) -> SegmentCursor:
        return SegmentCursor(self.table)

    def propose(self, answer: Sequence[int], cursor: SegmentCursor, n: int) -> list[int]:
        # A source whose last draft was rejected outright yields its turn once: where the previous
        # answer has stopped matching (a new segment length, another glue), a lookup within the
        # answer may still match, and the next call tries the previous answer again.
        order = self.sources
        if self._failed is not None and len(order) > 1:
            order = [s for s in order if s is not self._failed] + [self._failed]
        for s in order:
            got = s.propose(answer, cursor, n)
            if got:
                self._used = s
                return [int(t) for t in got[:n]]
        self._used = None
        return []

    def update(self, drafted: int, accepted: int) -> None:
        self._failed = self._used if drafted and accepted == 0 else None
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.max_k, 2 * self.k)
        else:
            self.k = max(self.min_k, min(self.k, 2 * (accepted + 1)))
