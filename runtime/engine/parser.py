"""Reading a MolmoAct answer: depth codes, trajectory trace and action lists.

Two layers:

* ``extract_*`` and ``parse_actions`` reproduce the official regex parser (``modeling_molmoact.py``:
  ``extract_depth_string``, ``extract_trace_lists``, ``extract_action_token_lists``,
  ``parse_action``) including its leniency: an unknown action string silently becomes bin 0, a
  missing part is simply an empty list. They exist so the runtime reads answers exactly as the
  reference does.
* ``parse_step`` uses those functions but also reports, in ``parse_errors``, everything a robot
  operator must know about: a missing or malformed depth block, a trace out of range, an action
  string outside the action table. It never hides a problem and never raises on model output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from molmoact_edge.runtime.engine.actions import ActionDecoder

# Same patterns as the official parser (not shared code: written to its documented behaviour).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?$")
_DEPTH_BLOCK = re.compile(r"<DEPTH_START>(.*?)<DEPTH_END>", re.DOTALL)
_OUTER_BLOCK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])+\]")
_FLAT_LIST = re.compile(r"\[([^\[\]]+)\]")
_DEPTH_CODE = re.compile(r"<DEPTH_(\d+)>")

DEFAULT_DEPTH_CODES = 100  # a 10x10 grid (MOLMOACT.md section 8); the tokenizer only knows the codebook size
TRACE_MAX_POINTS = 5
TRACE_MAX_VALUE = 255


def _is_number(s: str) -> bool:
    return _NUMBER.match(s) is not None


def _number(s: str):
    v = float(s)
    return int(v) if v.is_integer() else v


def _split_items(inner: str) -> list[str]:
    # str.strip() with no argument also removes Unicode whitespace, as in the official code.
    return [p.strip().strip('"').strip("'") for p in inner.split(",")]


# -- official-equivalent extraction -----------------------------------------------------------
def extract_depth_strings(text: str, include_tags: bool = True) -> list[str]:
    """Every ``<DEPTH_START>...<DEPTH_END>`` block (official ``parse_depth`` keeps the tags)."""
    if include_tags:
        return [m.group(0) for m in _DEPTH_BLOCK.finditer(text)]
    return [m.group(1) for m in _DEPTH_BLOCK.finditer(text)]


def extract_traces(text: str, point_len: int | None = 2, min_points: int = 1) -> list[list[list]]:
    """Numeric lists of points such as ``[[140, 225], [130, 212]]`` (official ``parse_trace``)."""
    traces = []
    for block in _OUTER_BLOCK.findall(text):
        rows_text = _FLAT_LIST.findall(block)
        if len(rows_text) < min_points:
            continue
        rows = []
        for row in rows_text:
            parts = _split_items(row)
            if (point_len is not None and len(parts) != point_len) or not all(_is_number(p) for p in parts):
                break
            rows.append([_number(p) for p in parts])
        else:
            traces.append(rows)
    return traces


def extract_action_lists(text: str, action_dim: int | None = None,
                         require_non_ascii: bool = True) -> list[list[str]]:
    """Every flat ``[...]`` list of ``action_dim`` items that is not all-numeric and holds a
    non-ASCII character: the action strings of one action each (all of them = a chunk)."""
    lists = []
    for inner in _FLAT_LIST.findall(text):
        parts = _split_items(inner)
        if action_dim is not None and len(parts) != action_dim:
            continue
        if all(_is_number(p) for p in parts):
            continue
        if require_non_ascii and not any(ord(c) > 127 for p in parts for c in p):
            continue
        lists.append(parts)
    return lists


def parse_actions(text: str, decoder: ActionDecoder, action_dim: int | None = None) -> np.ndarray:
    """Official ``parse_action``: every action list -> values, shape [n_lists, action_dim].

    ``action_dim`` defaults to the dimension of the decoder's statistics (as the official code
    takes it from ``norm_stats``)."""
    dim = _action_dim(decoder, action_dim)
    lists = extract_action_lists(text, action_dim=dim)
    if not lists:
        return np.zeros((0, dim), dtype=np.float64)
    return np.stack([decoder.decode_strings(items) for items in lists])


def depth_codes_from_string(depth: str) -> list[int] | None:
    """``<DEPTH_START><DEPTH_3>...<DEPTH_END>`` (tags optional) -> [3, ...]; None unless the text
    between the tags is nothing but code tokens."""
    inner = depth
    if inner.startswith("<DEPTH_START>") and inner.endswith("<DEPTH_END>"):
        inner = inner[len("<DEPTH_START>"):-len("<DEPTH_END>")]
    codes = [int(m.group(1)) for m in _DEPTH_CODE.finditer(inner)]
    if _DEPTH_CODE.sub("", inner) != "":
        return None
    return codes


def trace_to_pixels(trace, width: int, height: int) -> np.ndarray:
    """Trace points (0..255 over the first image) -> pixel coordinates: v / 255 * (size - 1)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    pts = np.asarray(trace, dtype=np.float64).reshape(-1, 2)
    return pts / float(TRACE_MAX_VALUE) * np.array([width - 1, height - 1], dtype=np.float64)


def _action_dim(decoder: ActionDecoder, action_dim: int | None) -> int:
    if action_dim is not None:
        return action_dim
    if decoder.stats is None:
        raise ValueError("action_dim is needed when the decoder has no norm_stats to take it from")
    return decoder.stats.action_dim


# -- the reporting parser ---------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedStep:
    """One answer, read. ``actions`` is [n, action_dim] (n = 0 when none was found); every
    problem is listed in ``parse_errors`` (empty = the answer was well formed)."""

    depth: list[int] | None
    trace: list[list[int]] | None
    actions: np.ndarray
    parse_errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.actions, np.ndarray) or self.actions.ndim != 2:
            raise ValueError(f"field 'actions' must be a 2-D numpy array [n, action_dim], got {self.actions!r}")

    @property
    def ok(self) -> bool:
        return not self.parse_errors


def parse_step(text: str, decoder: ActionDecoder, action_dim: int | None = None,
               depth_codes: int = DEFAULT_DEPTH_CODES, codebook_size: int | None = None) -> ParsedStep:
    """Read one decoded answer (special tokens kept) the official way and report what is off.

    The first depth block and the first trace are returned; extra ones are reported. Actions are
    all action lists, decoded exactly as ``parse_actions`` does (unknown strings -> bin 0), with
    each unknown string named in ``parse_errors``."""
    dim = _action_dim(decoder, action_dim)
    errors: list[str] = []

    depth = None
    blocks = extract_depth_strings(text, include_tags=True)
    if not blocks:
        errors.append("depth: no <DEPTH_START>...<DEPTH_END> block")
    else:
        if len(blocks) > 1:
            errors.append(f"depth: {len(blocks)} depth blocks; the first is used")
        depth = depth_codes_from_string(blocks[0])
        if depth is None:
            errors.append("depth: the depth block holds text other than <DEPTH_k> tokens")
        else:
            if len(depth) != depth_codes:
                errors.append(f"depth: {len(depth)} codes, expected {depth_codes}")
            if codebook_size is not None and any(c >= codebook_size for c in depth):
                errors.append(f"depth: code(s) outside the codebook of {codebook_size}")

    trace = None
    traces = extract_traces(text, point_len=2, min_points=1)
    if not traces:
        errors.append("trace: no [[x, y], ...] list of points")
    else:
        if len(traces) > 1:
            errors.append(f"trace: {len(traces)} traces; the first is used")
        trace = traces[0]
        if len(trace) > TRACE_MAX_POINTS:
            errors.append(f"trace: {len(trace)} points, at most {TRACE_MAX_POINTS} expected")
        bad = [v for pt in trace for v in pt if not (isinstance(v, int) and 0 <= v <= TRACE_MAX_VALUE)]
        if bad:
            errors.append(f"trace: values {bad} are not integers in [0, {TRACE_MAX_VALUE}]")

    lists = extract_action_lists(text, action_dim=dim)
    other = [len(p) for p in extract_action_lists(text, action_dim=None) if len(p) != dim]
    if other:
        errors.append(f"actions: list(s) of {other} items ignored; the action dimension is {dim}")
    if not lists:
        errors.append(f"actions: no list of {dim} action strings")
        actions = np.zeros((0, dim), dtype=np.float64)
    else:
        for i, items in enumerate(lists):
            unknown = [s for s in items if not decoder.is_action_string(s)]
            if unknown:
                errors.append(f"actions[{i}]: {unknown} are not action strings; read as bin 0 like the "
                              "official parser")
        actions = np.stack([decoder.decode_strings(items) for items in lists])
    return ParsedStep(depth=depth, trace=trace, actions=actions, parse_errors=errors)
