"""ngdref.sampling_key: the per-step key of SF's labels, against blake2b written out here."""

from __future__ import annotations

import hashlib

import pytest

import ngdref


@pytest.mark.parametrize(("seed", "step"), [(0, 0), (0, 1), (7, 123456), (2**40, 3)])
def test_the_key_is_the_first_eight_bytes_of_blake2b(seed: int, step: int) -> None:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    assert ngdref.sampling_key(seed, step) == int.from_bytes(digest, "little")


def test_steps_and_seeds_give_different_keys() -> None:
    keys = {ngdref.sampling_key(seed, step) for seed in range(3) for step in range(50)}
    assert len(keys) == 150


@pytest.mark.parametrize(("seed", "step", "name"), [(0.5, 0, "seed"), (0, True, "step")])
def test_a_non_int_is_refused_by_name(seed: object, step: object, name: str) -> None:
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        ngdref.sampling_key(seed, step)  # type: ignore[arg-type]
