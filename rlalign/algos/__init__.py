"""Alignment algorithms by registered name; each module holds its config dataclass and build_batch/forward/loss.

Imports only torch and rlalign (no diffusers, peft or ray). See `rlalign.algos.common` for the contract and
docs/algorithms.md for the maths of each.
"""

from __future__ import annotations

from rlalign.algos import dde, ddpo, diffusion_dpo, ncp, tailorpo
from rlalign.algos.common import Algorithm

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("tailorpo", "tailorpo", tailorpo.build_batch, tailorpo.forward, tailorpo.loss, needs_step_pairs=True),
        Algorithm(
            "tailorpo_g",
            "tailorpo",
            tailorpo.build_batch,
            tailorpo.forward,
            tailorpo.loss,
            needs_step_pairs=True,
            needs_gradient_guidance=True,
        ),
        Algorithm("dde_stepwise", "dde", dde.build_batch, dde.forward_stepwise, dde.loss, offline_pairs=True),
        Algorithm("dde_single_shot", "dde", dde.build_batch, dde.forward_single_shot, dde.loss, offline_pairs=True),
        Algorithm(
            "diffusion_dpo",
            "diffusion_dpo",
            diffusion_dpo.build_batch,
            diffusion_dpo.forward,
            diffusion_dpo.loss,
            offline_pairs=True,
        ),
        Algorithm("ncp_dpo", "ncp", ncp.build_batch, ncp.forward_dpo, ncp.loss_dpo, offline_pairs=True),
        Algorithm(
            "ncp_cpo", "ncp", ncp.build_batch, ncp.forward_cpo, ncp.loss_cpo, is_preference=False, offline_pairs=True
        ),
        Algorithm(
            "ncp_sft", "ncp", ncp.build_batch, ncp.forward_sft, ncp.loss_sft, is_preference=False, offline_pairs=True
        ),
        Algorithm("ddpo", "ddpo", ddpo.build_batch, ddpo.forward, ddpo.loss, is_preference=False),
    )
}


class UnknownAlgorithmError(KeyError):
    """`get_algorithm` got a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm `name`; UnknownAlgorithmError (a KeyError) listing the valid names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        valid = ", ".join(sorted(ALGORITHMS))
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; valid names: {valid}") from None
