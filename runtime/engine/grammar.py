"""MolmoAct's output grammar as a token-level automaton over the real tokenizer.

The textual form it enforces (decided from the fixture's ``action_parsing.json`` text 0 and
MOLMOACT.md section 8)::

    GLUE <DEPTH_START> <DEPTH_k> x N <DEPTH_END> GLUE [[x, y], [x, y], ...]GLUE ACTIONS GLUE <eos>
    ACTIONS = [a1, a2, ..., aD]                     one action list, or
              [a1, ..., aD], [b1, ..., bD], ...      flat chunk of up to K lists, or
              [[a1, ..., aD], [b1, ..., bD], ...]    nested chunk of up to K lists

* GLUE is free text of at most ``glue_budget`` tokens per gap, made of base-vocabulary tokens
  without ``[``, ``]``, ``<`` or ``>`` (so glue can never form a list or a depth tag that the
  official regex parser would pick up). The last gap may end with EOS; EOS is allowed nowhere else.
  With ``glue="official"`` every gap is instead forced to the official wording (``OFFICIAL_GLUE``,
  canonically tokenised), and so are the brackets around it: the trace opens with ``" [["`` and
  closes with the token ``"]]."``, the actions are a flat chunk opened by ``" ["`` whose last list
  closes with ``"]."``. A policy trained only on that wording (the demo policy) has never been
  taught anything about other glue tokens, so they must not be able to win.
* With a token budget (``start(max_tokens=...)``, the decode loop passes ``max_new_tokens``) a
  choice is allowed only while the shortest completion after it still fits: near the end of the
  budget glue closes, numbers and action strings take their shortest forms and no further trace
  point or action list is opened. It only ever removes choices, so every answer it allows is
  one the unbudgeted grammar allows too.
* N depth codes (100 = the 10x10 grid) of the tokenizer's ``<DEPTH_k>`` tokens.
* 1-5 trace points, integers 0..255 written without leading zeros, ``", "`` and ``"], ["``
  between them.
* each aI is the spelling of one of the last ``n_action_bins`` base-vocabulary entries, items
  separated by ``", "``, no quotes. In a flat chunk ``"],"`` after list k < K always means "a
  list follows" (the next token is then forced to ``" ["``); after list K it is ``"]"`` + glue.
* Openers: ``" [["``/``"[["`` for the trace, ``" ["``/``"["`` (one list, flat chunk) or
  ``" [["``/``"[["`` (nested chunk) for the actions; closers: any token spelling the closing
  bracket(s) followed by glue characters (``"]]."``, ``"]]"``, ``"]."``, ``"]\n"``, ...).

Canonical tokenisation. The model tokenises its own output canonically, and a BPE spelling that
is not canonical would be a different token sequence, so inside the depth block, the trace and
the action lists the automaton accepts exactly the canonical tokens. No pre-token of the Qwen2
split regex spans a ``", "`` separator, and ``[`` never merges forward nor ``]`` backward into an
action string (checked for every action string when the tables are built),
but it does merge the comma into an action string ending in a symbol (``Â®,``) and the closing
bracket with the punctuation of the glue that follows (``]].``, ``].``). So each list element is
tokenised by the real tokenizer in its context (after an opening bracket, between commas, before
the closing bracket) and those sequences form one trie per context; a closing bracket is any
token that starts with it and continues with glue. Only at the glue borders (opening and closing
brackets) does the automaton accept more than the canonical split, because glue is free text.

Cost per decode step: sparse states hold their allowed ids as small precomputed arrays, glue
states one precomputed boolean mask per gap; nothing scans the vocabulary after construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from molmoact_edge.runtime.engine.actions import ActionDecoder
from molmoact_edge.runtime.engine.events import (
    ActionComplete,
    DepthComplete,
    Event,
    Finished,
    TraceComplete,
)
from molmoact_edge.runtime.engine.parser import (
    DEFAULT_DEPTH_CODES,
    TRACE_MAX_POINTS,
    TRACE_MAX_VALUE,
)

GLUE_FORBIDDEN = "[]<>"
GLUE_MODES = ("free", "official")
# The fixture's action_parsing.json text 0: the glue before the depth block, the trace, the actions
# and after them (the space before each opening bracket is part of its token, see the docstring).
OFFICIAL_GLUE = ("The depth map of the first image is ",
                 ". The trajectory of the end effector in the first image is ",
                 ". Based on these information, along with other images from different camera views as additional "
                 "information, the action that the robot should take is ",
                 ".")

# phases of an answer
GLUE_DEPTH, DEPTH, GLUE_TRACE, TRACE, GLUE_ACTION, ACTION, GLUE_END, DONE = range(8)
GLUE_PHASES = (GLUE_DEPTH, GLUE_TRACE, GLUE_ACTION, GLUE_END)
_PHASE_NAMES = ("glue before depth", "depth codes", "glue before trace", "trace", "glue before actions",
                "actions", "glue before end", "done")
# trace sub-states
T_NUM, T_SPACE, T_OPEN = range(3)
# action sub-states
A_ELEM, A_CLOSE, A_OPEN = range(3)


_NO_LIMIT = 1 << 62
# a trace point: digits "," " " digits closer, numbers of 1..3 digits
_POINT = {False: 5, True: 9}  # shortest, longest


def _trace_tokens(target, i: int, field: int, digits: str) -> int:
    """Tokens left of a steered trace from point i, field, with ``digits`` of that field written."""
    x, y = (str(v) for v in target[i])
    if field == 0:
        n = len(x) - len(digits) + 2 + len(y) + 1
    else:
        n = len(y) - len(digits) + 1
    return n + sum(1 + len(str(a)) + 2 + len(str(b)) + 1 for a, b in target[i + 1:])


class GrammarError(ValueError):
    """A token the grammar does not allow here, or a tokenizer/option the grammar cannot support."""


@dataclass(frozen=True)
class GrammarSpec:
    action_dim: int
    n_action_bins: int = 256
    depth_codes: int = DEFAULT_DEPTH_CODES
    max_actions: int = 1
    glue_budget: int = 64
    glue: str = "free"  # "official": every glue gap forced to OFFICIAL_GLUE

    def __post_init__(self):
        for name, lo in (("action_dim", 1), ("n_action_bins", 2), ("depth_codes", 1), ("max_actions", 1),
                         ("glue_budget", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise GrammarError(f"field {name!r} must be an integer >= {lo}, got {v!r}")
        if self.glue not in GLUE_MODES:
            raise GrammarError(f"field 'glue' must be one of {GLUE_MODES}, got {self.glue!r}")


class _Trie:
    """Token sequences -> payload, as arrays per node (allowed ids, child per id, payload at leaves)."""

    def __init__(self, seqs: dict[int, list[int]], what: str, terminated: bool = True):
        # terminated: every sequence ends in a delimiter (the comma), so none can be a prefix of
        # another. Before a closing bracket there is no delimiter and one action string's tokens
        # can continue into another's (" ðĸ¥" vs " ðĸ¥¨"): such a node has a payload and children.
        children: list[dict[int, int]] = [{}]
        leaf: list[int] = [-1]
        for payload, seq in seqs.items():
            if not seq:
                raise GrammarError(f"{what}: rank {payload} has an empty token sequence")
            node = 0
            for t in seq:
                if leaf[node] >= 0 and terminated:
                    raise GrammarError(f"{what}: the tokens of rank {leaf[node]} are a prefix of rank {payload}'s")
                nxt = children[node].get(t)
                if nxt is None:
                    nxt = len(children)
                    children[node][t] = nxt
                    children.append({})
                    leaf.append(-1)
                node = nxt
            if (children[node] and terminated) or leaf[node] >= 0:
                raise GrammarError(f"{what}: the tokens of rank {payload} are a prefix of another rank's "
                                   "or the same as theirs")
            leaf[node] = payload
        self.children = children
        self.leaf = leaf
        self.ids = [np.array(sorted(c), dtype=np.int64) for c in children]
        # Fewest tokens from a node to a complete string (children are numbered after their
        # parent, so one backward pass sees every child first), and what each child costs beyond
        # that: the budget check keeps only the children whose cost still fits.
        mind = [0] * len(children)
        for n in range(len(children) - 1, -1, -1):
            if leaf[n] < 0:
                mind[n] = 1 + min(mind[c] for c in children[n].values())
        self.min_left = mind
        # and the most: how long a string the model may still choose from here
        most = [0] * len(children)
        for n in range(len(children) - 1, -1, -1):
            most[n] = max([1 + most[c] for c in children[n].values()], default=0)
        self.max_left = most
        self.extra = [np.array([1 + mind[children[n][int(t)]] - mind[n] for t in self.ids[n]], dtype=np.int64)
                      for n in range(len(children))]
        self.max_extra = [int(e.max()) if e.size else 0 for e in self.extra]

    def __len__(self) -> int:
        return len(self.children)


class OutputGrammar:
    """Tables of the automaton for one tokenizer and one answer shape; ``start`` makes a cursor."""

    def __init__(self, spec: GrammarSpec, tokenizer, decoder: ActionDecoder):
        self.spec = spec
        self.tokenizer = tokenizer
        self.decoder = decoder
        sp = tokenizer.special
        self.size = len(tokenizer)
        self.eos = sp.eos
        self.depth_start, self.depth_end = sp.depth_start, sp.depth_end
        self.depth_code_ids = np.sort(np.array(sp.depth_codes, dtype=np.int64))
        self.code_of = {int(t): k for k, t in enumerate(sp.depth_codes)}
        if decoder.base_vocab_size != sp.base_vocab_size or decoder.n_action_bins != spec.n_action_bins:
            raise GrammarError("the action decoder was built for another tokenizer or n_action_bins")
        self._build_vocab_tables(tokenizer.rust.get_vocab(with_added_tokens=False), sp.base_vocab_size)
        self._build_element_tries()
        # free glue: no forced tokens, every closing bracket that continues with glue
        self.forced_glue = {ph: () for ph in GLUE_PHASES}
        self.trace_closers, self.action_closers = self.closers2, self.closers1
        self.glue_forced = False  # set once the official tables are built (they are cut by the free automaton)
        if spec.glue == "official":
            self._force_official_glue()

    @classmethod
    def from_tokenizer(cls, tokenizer, action_dim: int, n_action_bins: int = 256,
                       depth_codes: int = DEFAULT_DEPTH_CODES, max_actions: int = 1, glue_budget: int = 64,
                       decoder: ActionDecoder | None = None, glue: str = "free") -> OutputGrammar:
        """``depth_codes`` codes per depth block, 1..``max_actions`` action lists, at most
        ``glue_budget`` free tokens per glue gap (then the next part is forced, so even random
        weights finish); ``glue="official"`` forces every gap to the official wording instead.
        ``decoder`` (with an unnorm key) makes ActionComplete carry de-normalised
        values; without one they stay normalised."""
        spec = GrammarSpec(action_dim=action_dim, n_action_bins=n_action_bins, depth_codes=depth_codes,
                           max_actions=max_actions, glue_budget=glue_budget, glue=glue)
        if decoder is None:
            decoder = ActionDecoder(base_vocab=tokenizer.rust.get_vocab(with_added_tokens=False),
                                    base_vocab_size=tokenizer.special.base_vocab_size,
                                    n_action_bins=n_action_bins)
        elif decoder.stats is not None and decoder.stats.action_dim != action_dim:
            raise GrammarError(f"action_dim {action_dim} differs from norm_stats[{decoder.unnorm_key!r}] "
                               f"({decoder.stats.action_dim} dims)")
        return cls(spec, tokenizer, decoder)

    @classmethod
    def from_config(cls, config, tokenizer, unnorm_key: str | None = None, action_dim: int | None = None,
                    depth_codes: int = DEFAULT_DEPTH_CODES, max_actions: int = 1,
                    glue_budget: int = 64) -> OutputGrammar:
        """The grammar of a checkpoint: n_action_bins from its config, action_dim and the values
        of ActionComplete from ``norm_stats[unnorm_key]`` (unknown key: ConfigError listing the
        keys). Without norm_stats pass ``action_dim``; values then stay normalised."""
        decoder = ActionDecoder.from_checkpoint(config, tokenizer, unnorm_key, denormalize=bool(config.norm_stats))
        if action_dim is None:
            if decoder.stats is None:
                raise GrammarError("this checkpoint has no norm_stats to take action_dim from; pass action_dim")
            action_dim = decoder.stats.action_dim
        return cls.from_tokenizer(tokenizer, action_dim, n_action_bins=config.n_action_bins,
                                  depth_codes=depth_codes, max_actions=max_actions, glue_budget=glue_budget,
                                  decoder=decoder, glue=config.answer_glue)

    # -- construction -------------------------------------------------------------------------
    def _id(self, text: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise GrammarError(f"{text!r} is not one token in this tokenizer ({ids}); the grammar needs a "
                               "Qwen2-style byte-level BPE vocabulary")
        return ids[0]

    def _build_vocab_tables(self, vocab: dict[str, int], base: int) -> None:
        glue = np.zeros(self.size, dtype=bool)
        closers1, closers2 = [], []
        for s, i in vocab.items():
            # Printable ASCII is its own byte-level spelling, so checking characters is exact.
            if not any(c in s for c in GLUE_FORBIDDEN):
                glue[i] = True
            elif s.startswith("]"):
                rest = s[2:] if s.startswith("]]") else s[1:]
                if not any(c in rest for c in GLUE_FORBIDDEN):
                    (closers2 if s.startswith("]]") else closers1).append(i)
        glue[base:] = False
        self.glue_mask = glue
        self.closers1 = np.array(sorted(closers1), dtype=np.int64)
        self.closers2 = np.array(sorted(closers2), dtype=np.int64)
        self.close_set1, self.close_set2 = set(closers1), set(closers2)
        self.digit_of = {self._id(str(d)): d for d in range(10)}
        self.digit_id = {d: i for i, d in self.digit_of.items()}
        self.comma, self.space = self._id(","), self._id(" ")
        self.close_point = self._id("],")  # also "end of list, another follows" in action chunks
        self.open_point = self._id(" [")
        self.open1 = (self._id(" ["), self._id("["))
        self.open2 = (self._id(" [["), self._id("[["))
        self.closers2_more = np.array(sorted(closers2 + [self.close_point]), dtype=np.int64)
        self.trace_openers = np.array(sorted(self.open2), dtype=np.int64)
        self.action_openers = np.array(sorted(self.open1 + self.open2), dtype=np.int64)

        def with_ids(ids) -> np.ndarray:
            m = glue.copy()
            m[np.asarray(ids, dtype=np.int64)] = True
            return m

        self.glue_masks = {GLUE_DEPTH: with_ids([self.depth_start]), GLUE_TRACE: with_ids(self.trace_openers),
                           GLUE_ACTION: with_ids(self.action_openers), GLUE_END: with_ids([self.eos])}
        self.glue_exits = {GLUE_DEPTH: np.array([self.depth_start]), GLUE_TRACE: self.trace_openers,
                           GLUE_ACTION: self.action_openers, GLUE_END: np.array([self.eos])}
        self.glue_exit_sets = {k: frozenset(int(i) for i in v) for k, v in self.glue_exits.items()}
        self._glue_ids = {k: np.flatnonzero(m) for k, m in self.glue_masks.items()}
        self._num_cache: dict[tuple, np.ndarray] = {}

    def _build_element_tries(self) -> None:
        n, dim = self.spec.n_action_bins, self.spec.action_dim
        table = [self.tokenizer.id_to_token(int(i)) for i in self.decoder.action_ids()]
        for r, s in enumerate(table):
            if s is None or any(c in s for c in "[],'\"") or any(c.isspace() for c in s):
                raise GrammarError(f"action string of rank {r} ({s!r}) cannot be written inside a list")
        enc = self.tokenizer.rust.encode_batch

        def batch(texts):
            return [e.ids for e in enc(texts, add_special_tokens=False)]

        self.rank_id = [int(i) for i in self.decoder.action_ids()]
        close = self._id("]")

        def contextual(before: str, after: str, strip_last: bool, what: str) -> dict[int, list[int]]:
            out: dict[int, list[int]] | None = None
            openers = (" [", "[", " [[", "[[") if before == "[" else (before,)
            for o in openers:
                seqs = batch([o + s + after for s in table])
                got = {}
                for r, seq in enumerate(seqs):
                    if o != " " and seq[0] != self._id(o):
                        raise GrammarError(f"{what}: {o!r} merges into action string {table[r]!r}")
                    body = seq[1:] if o != " " else seq
                    if strip_last:
                        if body[-1] != close:
                            raise GrammarError(f"{what}: ']' merges into action string {table[r]!r}")
                        body = body[:-1]
                    got[r] = body
                if out is not None and got != out:
                    raise GrammarError(f"{what}: action strings tokenise differently after {o!r}")
                out = got
            return out

        if dim == 1:
            self.trie_first = self.trie_last = _Trie(contextual("[", "]", True, "only element"), "only element",
                                                     terminated=False)
            self.trie_mid = None
        else:
            self.trie_first = _Trie(contextual("[", ",", False, "first element"), "first element")
            self.trie_mid = _Trie(contextual(" ", ",", False, "middle element"), "middle element")
            self.trie_last = _Trie(contextual(" ", "]", True, "last element"), "last element", terminated=False)
        tries = [self.trie_first] + [self.trie_mid] * (dim - 2) + ([self.trie_last] if dim > 1 else [])
        # tail[worst][e]: fewest (most) tokens for elements e.. of a list; list_len adds its closer
        self.tail = {False: [sum(t.min_left[0] for t in tries[e:]) for e in range(dim + 1)],
                     True: [sum(t.max_left[0] for t in tries[e:]) for e in range(dim + 1)]}
        self.list_len = {w: self.tail[w][0] + 1 for w in (False, True)}

    def _force_official_glue(self) -> None:
        """Tokenise one answer in the official wording and let the free automaton cut it: the
        tokens it reads as glue become each gap's forced sequence, the token that leaves a gap its
        only exit, and the tokens that close the trace and the last action list the only closers."""
        g0, g1, g2, g3 = OFFICIAL_GLUE
        table = [self.tokenizer.id_to_token(i) for i in self.rank_id]
        text = (g0 + "<DEPTH_START>" + "<DEPTH_0>" * self.spec.depth_codes + "<DEPTH_END>" + g1 + "[[1, 2]]" + g2
                + "[" + ", ".join(table[:1] * self.spec.action_dim) + "]" + g3)
        ids = self.tokenizer.encode(text) + [self.eos]
        state = GrammarState(self)
        glue = {ph: [] for ph in GLUE_PHASES}
        exits, closers = {}, {}
        for t in ids:
            before = state.phase
            state.advance(t)  # the free grammar accepts the official wording (GrammarError otherwise)
            if before in GLUE_PHASES:
                (glue[before].append(t) if state.phase == before else exits.__setitem__(before, t))
            elif before in (TRACE, ACTION) and state.phase != before:
                closers[before] = t
        if not state.is_complete:
            raise GrammarError("the official wording did not tokenise into one complete answer")
        self.forced_glue = {ph: tuple(v) for ph, v in glue.items()}
        self.glue_exits = {ph: np.array([exits[ph]], dtype=np.int64) for ph in GLUE_PHASES}
        self.glue_exit_sets = {ph: frozenset([exits[ph]]) for ph in GLUE_PHASES}
        self.trace_closers = np.array([closers[TRACE]], dtype=np.int64)
        self.action_closers = np.array(sorted({closers[ACTION], self.close_point}), dtype=np.int64)
        self._num_cache.clear()
        self.glue_forced = True

    # -- cursors ------------------------------------------------------------------------------
    def start(self, trace=None, max_tokens: int | None = None) -> GrammarState:
        """A cursor at the beginning of an answer. ``trace`` (1-5 (x, y) integer points in 0..255)
        is forced into the trace slot: MolmoAct's trajectory steering. ``max_tokens`` is the
        caller's token budget: once what is left of it nears the shortest way to finish the
        answer, only tokens on a path that still fits are allowed (glue closes, lists end), so the
        answer completes within it whenever the budget can hold an answer at all."""
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise GrammarError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        target = None
        if trace is not None:
            pts = [tuple(p) for p in trace]
            ok = 1 <= len(pts) <= TRACE_MAX_POINTS and all(
                len(p) == 2 and all(isinstance(v, (int, np.integer)) and 0 <= v <= TRACE_MAX_VALUE for v in p)
                for p in pts)
            if not ok:
                raise GrammarError(f"steering trace must be 1-{TRACE_MAX_POINTS} (x, y) integer points in "
                                   f"0..{TRACE_MAX_VALUE}, got {trace!r}")
            target = tuple((int(x), int(y)) for x, y in pts)
        state = GrammarState(self, target, max_tokens)
        if max_tokens is not None and state.min_to_finish() > max_tokens:
            # Refused here, before any forward: otherwise the cursor would run out of allowed tokens
            # mid-answer and the step would fail with a message about a phase, not about the budget.
            raise GrammarError(f"a budget of {max_tokens} new tokens cannot hold a complete answer: the shortest "
                               f"this grammar allows is {state.min_to_finish()} tokens ({self.spec.depth_codes} depth codes, "
                               f"one trace point, one action); raise --max-new-tokens to at least "
                               f"{state.min_to_finish()}, or pass --no-grammar")
        return state

    def number_ids(self, digits: str, field: int, more_points: bool) -> np.ndarray:
        key = (digits, field, more_points)
        ids = self._num_cache.get(key)
        if ids is None:
            opts = []
            if digits == "":
                opts = list(self.digit_id.values())
            else:
                if digits != "0":
                    opts = [i for d, i in self.digit_id.items() if int(digits + str(d)) <= TRACE_MAX_VALUE]
                if field == 0:
                    opts.append(self.comma)
                else:
                    if more_points:
                        opts.append(self.close_point)
                    opts.extend(self.trace_closers.tolist())
            ids = np.array(sorted(opts), dtype=np.int64)
            self._num_cache[key] = ids
        return ids

    def token_text(self, token_id: int) -> str:
        return repr(self.tokenizer.id_to_token(int(token_id)))


class GrammarState:
    """Where the decoder is inside an answer. Mutable: ``advance`` moves it; ``copy`` forks it."""

    def __init__(self, grammar: OutputGrammar, target=None, max_tokens: int | None = None):
        self.g = grammar
        self.target = target
        self.max_tokens = max_tokens
        self.phase = GLUE_DEPTH
        self.glue_used = 0
        self.n_tokens = 0
        self.codes: list[int] = []
        self.points: list[tuple[int, int]] = []
        self.digits, self.field, self.x, self.tsub = "", 0, 0, T_NUM
        self.nested, self.n_lists, self.elem, self.node, self.asub = False, 0, 0, 0, A_ELEM
        self.cur_ranks: list[int] = []

    def copy(self) -> GrammarState:
        s = copy.copy(self)
        s.codes, s.points, s.cur_ranks = list(self.codes), list(self.points), list(self.cur_ranks)
        return s

    @property
    def is_complete(self) -> bool:
        return self.phase == DONE

    @property
    def phase_name(self) -> str:
        return _PHASE_NAMES[self.phase]

    # -- allowed sets -------------------------------------------------------------------------
    def _trie(self):
        g = self.g
        if self.elem == 0:
            return g.trie_first
        return g.trie_last if self.elem == g.spec.action_dim - 1 else g.trie_mid

    def _sparse_ids(self) -> np.ndarray | None:
        """Allowed ids (sorted) where they are few; None in free glue (use the precomputed mask)."""
        g, ph = self.g, self.phase
        if ph in GLUE_PHASES and g.glue_forced:
            forced = g.forced_glue[ph]
            return np.array([forced[self.glue_used]]) if self.glue_used < len(forced) else g.glue_exits[ph]
        if ph in (GLUE_DEPTH, GLUE_TRACE, GLUE_ACTION, GLUE_END):
            # glue only while the longest completion still fits after it: the budget never
            # shortens the model's numbers or action strings because of its own glue
            closed = self.glue_used >= g.spec.glue_budget or not self._fits(self.to_finish(worst=True))
            return g.glue_exits[ph] if closed else None
        if ph == DEPTH:
            if len(self.codes) < g.spec.depth_codes:
                return g.depth_code_ids
            return np.array([g.depth_end])
        if ph == TRACE:
            if self.tsub == T_SPACE:
                return np.array([g.space])
            if self.tsub == T_OPEN:
                return np.array([g.open_point])
            return self._trace_number_ids()
        if ph == ACTION:
            if self.asub == A_ELEM:
                trie = self._trie()
                ids = trie.ids[self.node]
                slack = self._slack()
                if slack < trie.max_extra[self.node]:
                    ids = ids[trie.extra[self.node] <= slack]
                if trie.leaf[self.node] >= 0:  # a complete action string that could also go on
                    return np.union1d(ids, self._close_ids(self.n_lists + 1))
                return ids
            if self.asub == A_OPEN:
                return np.array([g.open_point])
            return self._close_ids(self.n_lists)
        return np.zeros(0, dtype=np.int64)

    def _close_ids(self, lists_done: int) -> np.ndarray:
        g = self.g
        more = lists_done < g.spec.max_actions
        if not self.nested:
            ids = g.action_closers  # "]," continues the chunk while lists remain, else it is "]" + glue
            if not more and g.glue_forced:  # that glue "," is not the official wording
                ids = ids[ids != g.close_point]
        else:
            ids = g.closers2_more if more else g.closers2
        if more and not self._fits(g.list_len[True] + 2 + self._glue_left()):  # no room for another list: "]," is out
            ids = ids[ids != g.close_point]
        return ids

    def _trace_number_ids(self) -> np.ndarray:
        g, t = self.g, self.target
        if t is None:
            more = len(self.points) + 1 < TRACE_MAX_POINTS
            ids = g.number_ids(self.digits, self.field, more)
            if self.digits:
                # another point ("]," then " [" and the point) only if its longest form fits;
                # another digit only if the shortest completion still does
                drop = [] if self._fits(1 + _POINT[True] + self._after_trace(True) + self._glue_left()) else [g.close_point]
                if self._slack() < 1:
                    drop += list(g.digit_of)
                if drop:
                    ids = ids[~np.isin(ids, drop)]
            return ids
        want = str(t[len(self.points)][self.field])
        if len(self.digits) < len(want):
            return np.array([g.digit_id[int(want[len(self.digits)])]])
        if self.field == 0:
            return np.array([g.comma])
        return np.array([g.close_point]) if len(self.points) + 1 < len(t) else g.trace_closers

    # -- the token budget -----------------------------------------------------------------------
    # Two bounds: optional structure (glue, another trace point, another action list) is allowed
    # only while the LONGEST completion after it fits, so with a budget that holds one answer's
    # longest form the model's numbers and action strings are never cut; those values are
    # limited only when the SHORTEST completion would no longer fit (a budget below that form).
    def _fits(self, tokens_after_next: int) -> bool:
        """Whether the budget left after the next token holds ``tokens_after_next`` more."""
        return self.max_tokens is None or self.max_tokens - self.n_tokens - 1 >= tokens_after_next

    def _slack(self) -> int:
        """Tokens of the budget beyond the shortest way to finish the answer from here."""
        if self.max_tokens is None:
            return _NO_LIMIT
        return self.max_tokens - self.n_tokens - self.to_finish()

    def _after_trace(self, worst: bool) -> int:
        return 1 + self.g.list_len[worst] + 1  # opener, one list, EOS

    def to_finish(self, worst: bool = False) -> int:
        """Tokens that complete the answer from here with no optional glue (forced glue counts),
        one trace point and one action list, EOS included: the fewest, or with ``worst`` the most
        the model's values may take."""
        return self._structure_left(worst) + self._glue_left()

    def _glue_left(self) -> int:
        """Forced glue tokens still to come (none with free glue: it is optional)."""
        if not self.g.glue_forced:
            return 0
        f = self.g.forced_glue
        n = sum(len(f[ph]) for ph in GLUE_PHASES if ph > self.phase)
        return n + (len(f[self.phase]) - self.glue_used if self.phase in GLUE_PHASES else 0)

    def _structure_left(self, worst: bool) -> int:
        g, ph = self.g, self.phase
        if ph == DONE:
            return 0
        if ph == GLUE_END:
            return 1
        if ph == ACTION:
            if self.asub == A_CLOSE:
                return 2
            if self.asub == A_OPEN:
                return self._after_trace(worst)
            trie = self._trie()
            left = trie.max_left if worst else trie.min_left
            return left[self.node] + g.tail[worst][self.elem + 1] + 2
        if ph == GLUE_ACTION:
            return self._after_trace(worst)
        if ph == TRACE:
            return self._trace_left(worst) + self._after_trace(worst)
        to_trace_end = 1 + self._trace_left(worst) + self._after_trace(worst)  # opener + whole trace
        if ph == GLUE_TRACE:
            return to_trace_end
        if ph == DEPTH:
            return g.spec.depth_codes - len(self.codes) + 1 + to_trace_end
        return 1 + g.spec.depth_codes + 1 + to_trace_end  # GLUE_DEPTH

    def min_to_finish(self) -> int:
        """The fewest tokens that complete the answer from here, EOS included."""
        return self.to_finish(worst=False)

    def _trace_left(self, worst: bool) -> int:
        """Tokens until the trace's closing bracket, inclusive (the whole trace before it has
        started), for the last point of the trace."""
        if self.phase != TRACE:
            return _trace_tokens(self.target, 0, 0, "") if self.target else _POINT[worst]
        if self.target is not None:
            i = len(self.points)
            if self.tsub == T_OPEN:
                return 1 + _trace_tokens(self.target, i, 0, "")
            if self.tsub == T_SPACE:
                return 1 + _trace_tokens(self.target, i, 1, "")
            return _trace_tokens(self.target, i, self.field, self.digits)
        digits = 3 if worst else 1  # a number still to write
        if self.tsub == T_OPEN:
            return 1 + _POINT[worst]
        if self.tsub == T_SPACE:
            return 1 + digits + 1
        if self.digits:  # more digits are optional: up to 3 in all ("0" takes none)
            digits = 0 if not worst or self.digits == "0" else 3 - len(self.digits)
        return digits + (1 if self.field == 1 else 2 + (3 if worst else 1) + 1)

    def allowed_ids(self) -> np.ndarray:
        """The allowed token ids, ascending (a view of a shared table: do not modify)."""
        ids = self._sparse_ids()
        return self.g._glue_ids[self.phase] if ids is None else ids

    def allowed_mask(self) -> np.ndarray:
        """Boolean mask over the tokenizer's full id range (callers slice to the output vocab)."""
        ids = self._sparse_ids()
        if ids is None:
            return self.g.glue_masks[self.phase].copy()
        m = np.zeros(self.g.size, dtype=bool)
        m[ids] = True
        return m

    def is_allowed(self, token_id: int) -> bool:
        ids = self._sparse_ids()
        if ids is None:
            return bool(self.g.glue_masks[self.phase][token_id]) if 0 <= token_id < self.g.size else False
        return bool(np.any(ids == token_id))

    def forced_span(self) -> list[int]:
        """The tokens the grammar leaves no choice about from here (possibly none)."""
        s, out = self.copy(), []
        while s.phase != DONE:
            ids = s._sparse_ids()
            if ids is None or len(ids) != 1:
                break
            out.append(int(ids[0]))
            s.advance(int(ids[0]))
        return out

    def accepts(self, token_ids, complete: bool = False) -> bool:
        """Whether the tokens can follow from here (and, with ``complete``, finish the answer).
        The state itself does not move."""
        s = self.copy()
        try:
            for t in token_ids:
                s.advance(int(t))
        except GrammarError:
            return False
        return s.is_complete or not complete

    # -- transitions --------------------------------------------------------------------------
    def advance(self, token_id: int) -> list[Event]:
        """Consume one token; returns the events it completes. Raises GrammarError (state
        unchanged) if the token is not allowed here."""
        token_id = int(token_id)
        if not self.is_allowed(token_id):
            raise GrammarError(f"token {token_id} {self.g.token_text(token_id)} is not allowed in "
                               f"'{self.phase_name}' after {self.n_tokens} tokens; allowed here: "
                               f"{self._describe_allowed()}")
        self.n_tokens += 1
        g, ph = self.g, self.phase
        if ph in (GLUE_DEPTH, GLUE_TRACE, GLUE_ACTION, GLUE_END):
            return self._advance_glue(token_id)
        if ph == DEPTH:
            if token_id == g.depth_end:
                self.phase, self.glue_used = GLUE_TRACE, 0
                return [DepthComplete(tuple(self.codes))]
            self.codes.append(g.code_of[token_id])
            return []
        if ph == TRACE:
            return self._advance_trace(token_id)
        return self._advance_action(token_id)

    def _advance_glue(self, t: int) -> list[Event]:
        g, ph = self.g, self.phase
        if t not in g.glue_exit_sets[ph]:
            self.glue_used += 1
            return []
        if ph == GLUE_DEPTH:
            self.phase = DEPTH
        elif ph == GLUE_TRACE:
            self.phase, self.tsub, self.field, self.digits = TRACE, T_NUM, 0, ""
        elif ph == GLUE_ACTION:
            self.phase, self.asub, self.elem, self.node = ACTION, A_ELEM, 0, 0
            self.nested = t in g.open2
        else:
            self.phase = DONE
            return [Finished(self.n_lists)]
        return []

    def _advance_trace(self, t: int) -> list[Event]:
        g = self.g
        if self.tsub == T_SPACE:
            self.tsub, self.field = T_NUM, 1
            return []
        if self.tsub == T_OPEN:
            self.tsub, self.field = T_NUM, 0
            return []
        if t in g.digit_of:
            self.digits += str(g.digit_of[t])
            return []
        value, self.digits = int(self.digits), ""
        if t == g.comma:
            self.x, self.tsub = value, T_SPACE
            return []
        self.points.append((self.x, value))
        if t == g.close_point:
            self.tsub = T_OPEN
            return []
        self.phase, self.glue_used = GLUE_ACTION, 0
        return [TraceComplete(tuple(self.points), steered=self.target is not None)]

    def _advance_action(self, t: int) -> list[Event]:
        g = self.g
        if self.asub == A_OPEN:
            self.asub, self.elem, self.node = A_ELEM, 0, 0
            return []
        if self.asub == A_CLOSE:
            more = self.n_lists < g.spec.max_actions  # n_lists already counts the list just closed
            if t == g.close_point and more:
                self.asub = A_OPEN
            else:
                self.phase, self.glue_used = GLUE_END, 0
            return []
        trie = self._trie()
        nxt = trie.children[self.node].get(t)
        if nxt is None:  # a closing bracket right after a string that could have gone on
            event = self._complete_action(trie.leaf[self.node])
            return [event] + self._advance_action(t)
        self.node = nxt
        rank = trie.leaf[self.node]
        if rank < 0 or trie.children[self.node]:
            return []
        if self.elem + 1 < g.spec.action_dim:
            self.cur_ranks.append(rank)
            self.elem, self.node = self.elem + 1, 0
            return []
        return [self._complete_action(rank)]

    def _complete_action(self, last_rank: int) -> ActionComplete:
        g = self.g
        self.cur_ranks.append(last_rank)
        ids = tuple(g.rank_id[r] for r in self.cur_ranks)
        dec = g.decoder
        bins = dec.bins_from_ids(ids)
        normalized = dec.normalized_from_bins(bins)
        values = dec.denormalize(normalized) if dec.stats is not None else None
        event = ActionComplete(self.n_lists, ids, bins, normalized, values)
        self.n_lists += 1
        self.cur_ranks, self.asub = [], A_CLOSE
        return event

    def _describe_allowed(self) -> str:
        ids = self._sparse_ids()
        if ids is None:
            return f"glue text without {GLUE_FORBIDDEN!r} or the next part's opening token"
        shown = ", ".join(f"{int(i)} {self.g.token_text(i)}" for i in ids[:8])
        return shown + (f" ... ({len(ids)} in all)" if len(ids) > 8 else "")
