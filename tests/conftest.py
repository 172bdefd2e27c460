"""Shared test helpers.

Golden data comes from ../shared/fixtures (outputs of the official MolmoAct implementation), never
from this project's own code. Set MOLMOACT_FIXTURES to point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MOLMOACT_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_A = FIXTURES / "molmoact-tiny-a"
CASES = ("single_256", "single_640x480", "multi_2x256", "nested_800x600")


def fixture_dirs() -> list[Path]:
    """Every tiny checkpoint fixture present (A always; B and later ones if shipped)."""
    return sorted(p for p in FIXTURES.glob("molmoact-tiny-*") if (p / "checkpoint" / "config.json").exists())


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    if not (FIXTURE_A / "checkpoint" / "config.json").exists():
        pytest.skip(f"golden fixture not found at {FIXTURE_A} (set MOLMOACT_FIXTURES)")
    return FIXTURE_A


@pytest.fixture(scope="session")
def checkpoint_a(fixture_a: Path) -> Path:
    return fixture_a / "checkpoint"
