"""argparse value types: a bad value is a parse error (exit 2) naming the flag, before anything loads."""

from __future__ import annotations

import argparse
import json
import re


def _whole_number_at_least(lo: int):
    """An argparse type for a whole number >= `lo`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


positive_int = _whole_number_at_least(1)
non_negative_int = _whole_number_at_least(0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def float_in(lo: float, hi: float, unit: str):
    """A number in [lo, hi] (`unit` names it in the error), e.g. a safety limit with a sane range."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit} in [{lo:g}, {hi:g}], got {text!r}") from None
        if not lo <= v <= hi:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}] {unit}, got {text}")
        return v
    parse.__name__ = f"number of {unit}"
    return parse


def instruction(text: str) -> str:
    # The engine's own check (tokens of the instruction need the tokenizer and are checked at run time)
    from molmoact_edge.runtime.engine.prompt import InputError, check_instruction

    try:
        check_instruction(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def torch_device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def trace_points(text: str) -> list[tuple[int, int]]:
    """A trace as JSON, e.g. "[[120, 200], [140, 180]]"."""
    try:
        pts = [tuple(int(v) for v in pt) for pt in json.loads(text)]
    except (json.JSONDecodeError, TypeError, ValueError):
        pts = None
    if not pts or any(len(p) != 2 for p in pts):
        raise argparse.ArgumentTypeError(f"expected a JSON list of [x, y] integer pairs, got {text!r}")
    return pts


def device_spec(kinds: dict[str, str]):
    """A `KIND[:ARG]` device spec; ``kinds`` maps each kind to '' (ARG optional), 'ARG' (ARG needed)."""
    def parse(text: str) -> str:
        kind, _, arg = text.partition(":")
        if kind not in kinds:
            accepted = ", ".join(f"{k}:{v}" if v else f"{k}[:...]" for k, v in kinds.items())
            raise argparse.ArgumentTypeError(f"{text!r}: expected one of {accepted}")
        if kinds[kind] and not arg:
            raise argparse.ArgumentTypeError(f"{text!r}: {kind} needs {kinds[kind]}, e.g. {kind}:{kinds[kind]}")
        return text
    parse.__name__ = "device spec"
    return parse
