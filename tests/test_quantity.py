"""Memory quantities (``256Mi``, ``1e6``): exact values, and bounded work and a clear error for hostile ones.

A quantity arrives in every load body and TrainedModel, so it is client input: ``1e999999999`` once built
``10**999999999``, and the pattern backtracked quadratically over long runs of spaces.
"""

from __future__ import annotations

import pytest

from rayms.config import _QUANTITY, MAX_QUANTITY_BYTES, MAX_QUANTITY_CHARS, ModelSpec, parse_quantity
from rayms.errors import InvalidSpec

pytestmark = pytest.mark.timeout(20)  # each case takes microseconds; the hostile ones once took minutes


@pytest.mark.parametrize(("text", "expected"), [
    ("256Mi", 256 * 2**20), ("1G", 10**9), ("1e6", 10**6), ("1.5Gi", 3 * 2**29), (" 2 Ki ", 2048),
    ("1000m", 1), ("100u", 0), ("0e999999999", 0), ("9.2e18", 9_200_000_000_000_000_000),
    ("7Ei", 7 * 2**60),
    (str(MAX_QUANTITY_BYTES), MAX_QUANTITY_BYTES), (1.5, 1), (2**40, 2**40),
])
def test_quantities_are_exact(text, expected) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(("value", "words"), [
    ("1e999999999", "more than the largest quantity accepted"),
    ("1e30", "more than the largest quantity accepted"),
    (str(MAX_QUANTITY_BYTES + 1), "more than the largest quantity accepted"),
    ("8Ei", "more than the largest quantity accepted"),
    (2**70, "more than the largest quantity accepted"),
    (1e300, "more than the largest quantity accepted"),
    (float("inf"), "not a finite number"),
    (float("nan"), "not a finite number"),
    ("1" * 100_000 + "x", f"100001 characters long, more than {MAX_QUANTITY_CHARS}"),
    ("1" + " " * 100_000 + "x", f"100002 characters long, more than {MAX_QUANTITY_CHARS}"),
    ("1" + " " * 60 + "x", "is not a Kubernetes quantity (e.g. 256Mi, 1G)"),
    ("lots", "is not a Kubernetes quantity (e.g. 256Mi, 1G)"),
    (-1, "is negative"),
    (True, "is not a Kubernetes quantity"),
])
def test_hostile_quantities_are_refused_quickly_and_clearly(value, words) -> None:
    with pytest.raises(InvalidSpec, match="^memory ") as caught:
        parse_quantity(value)
    assert words in str(caught.value)
    assert len(str(caught.value)) < 200  # a long value is not echoed back whole


def test_the_pattern_is_linear_even_without_the_length_cap() -> None:
    # Each would take minutes with neighbouring `\s*` groups; here every one fails at once.
    for text in ("1" + " " * 200_000 + "x", "1" * 200_000 + "x", "1." + "1" * 200_000 + " x",
                 "1e" + "1" * 200_000 + "x"):
        assert _QUANTITY.fullmatch(text) is None


def test_a_spec_with_a_hostile_memory_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec, match="^model m: memory '1e999999999' is more than the largest"):
        ModelSpec.parse({"storageUri": "/x", "framework": "sklearn", "memory": "1e999999999"}, name="m")
    with pytest.raises(InvalidSpec, match="^model m: memory inf is not a finite number"):
        ModelSpec.parse({"storageUri": "/x", "framework": "sklearn", "memory": float("inf")}, name="m")
