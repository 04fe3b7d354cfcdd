"""Algorithm registry: names, flags, config sections, clear errors."""

from __future__ import annotations

import pytest

from rlalign.algos import ALGORITHMS, get_algorithm
from rlalign.algos.common import Algorithm

NAMES = {
    "tailorpo",
    "tailorpo_g",
    "dde_stepwise",
    "dde_single_shot",
    "diffusion_dpo",
    "ncp_dpo",
    "ncp_cpo",
    "ncp_sft",
    "ddpo",
}


def test_registry_names_and_flags() -> None:
    assert set(ALGORITHMS) == NAMES
    for name, algo in ALGORITHMS.items():
        assert isinstance(algo, Algorithm) and algo.name == name
        assert algo.cfg_key in {"tailorpo", "dde", "diffusion_dpo", "ncp", "ddpo"}
    assert {n for n, a in ALGORITHMS.items() if a.needs_step_pairs} == {"tailorpo", "tailorpo_g"}
    assert {n for n, a in ALGORITHMS.items() if a.needs_gradient_guidance} == {"tailorpo_g"}
    assert {n for n, a in ALGORITHMS.items() if not a.is_preference} == {"ddpo", "ncp_cpo", "ncp_sft"}


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(KeyError) as err:
        get_algorithm("dpo")
    msg = str(err.value)
    assert "unknown algorithm 'dpo'" in msg and all(n in msg for n in NAMES)
