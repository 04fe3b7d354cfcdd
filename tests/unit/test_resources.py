"""`missing_resources`: what the roles ask Ray for against a `ray.cluster_resources()`-style dict, in words."""

from __future__ import annotations

import pytest

from rlalign.config import RunCfg, load_config
from rlalign.resources import describe, missing_resources, role_asks


def cfg_with(*overrides: str) -> RunCfg:
    return load_config(None, list(overrides))


def test_the_issue_case_three_samplers_on_a_two_cpu_head() -> None:
    # the tiny config's 3 one-CPU actors (1 sampler + learner + reward) and, here, 3 samplers: 5 CPUs on a 2-CPU head
    cfg = cfg_with("sampler.num_workers=3")
    assert missing_resources(cfg, {"CPU": 2.0, "memory": 8e9}) == [
        "samplers ask 3 x 1 CPU + learner 1 + rewards 1 = 5 CPUs; the cluster has 2"
    ]
    assert missing_resources(cfg, {"CPU": 5.0}) == []


def test_gpus_and_custom_resources_each_get_a_line() -> None:
    cfg = cfg_with(
        "sampler.num_workers=4",
        "sampler.num_gpus=1",
        "learner.num_gpus=1",
        "reward.models=[{name: digit_prompt, num_gpus: 0.5}]",
        "sampler.resources={node2: 1}",
    )
    assert missing_resources(cfg, {"CPU": 64.0, "GPU": 4.0}) == [
        "samplers ask 4 x 1 GPU + learner 1 + rewards 0.5 = 5.5 GPUs; the cluster has 4",
        "samplers ask 4 x 1 node2 = 4 node2; the cluster has none",
    ]
    assert missing_resources(cfg, {"CPU": 6.0, "GPU": 6.0, "node2": 4.0}) == []


def test_a_single_role_reads_without_a_sum() -> None:
    cfg = cfg_with("learner.num_gpus=2")
    assert missing_resources(cfg, {"CPU": 8.0, "GPU": 1.0}) == ["learner asks 2 GPUs; the cluster has 1"]
    assert missing_resources(cfg, {"CPU": 8.0}) == ["learner asks 2 GPUs; the cluster has none"]


def test_fractional_gpu_shares_must_each_fit_on_one_gpu() -> None:
    # 3 x 0.6 = 1.8 <= 2 GPUs in total, but two 0.6 shares do not fit on one GPU: the third actor waits forever
    cfg = cfg_with("sampler.num_workers=3", "sampler.num_gpus=0.6")
    lines = missing_resources(cfg, {"CPU": 8.0, "GPU": 2.0})
    assert len(lines) == 1 and lines[0].startswith("GPU shares 0.6 + 0.6 + 0.6 do not fit on the 2 GPU(s)"), lines
    assert missing_resources(cfg, {"CPU": 8.0, "GPU": 3.0}) == []
    halves = cfg_with("sampler.num_workers=4", "sampler.num_gpus=0.5")  # 4 x 0.5 pack exactly onto 2 GPUs
    assert missing_resources(halves, {"CPU": 8.0, "GPU": 2.0}) == []


def test_whole_gpu_actors_take_gpus_before_shares_are_packed() -> None:
    cfg = cfg_with("learner.num_gpus=1", "sampler.num_workers=2", "sampler.num_gpus=0.75")
    assert missing_resources(cfg, {"CPU": 8.0, "GPU": 3.0}) == []
    (line,) = missing_resources(cfg, {"CPU": 8.0, "GPU": 2.5})  # 2.5 >= 2.5 in total, but only 1 whole GPU left
    assert "do not fit on the 1 GPU(s)" in line and "the cluster has 2.5" in line


def test_memory_in_custom_resources_is_compared_in_gib() -> None:
    cfg = cfg_with(f"learner.resources={{memory: {64 * 2**30}}}")
    assert missing_resources(cfg, {"CPU": 8.0, "memory": 16 * 2**30}) == [
        "learner asks 64 GiB memory; the cluster has 16 GiB"
    ]


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        (("sampler.num_workers=1",), ["sampler asks 1 CPU", "learner asks 1 CPU", "reward actor asks 1 CPU"]),
        (
            ("sampler.num_workers=2", "sampler.num_gpus=0.5", "sampler.resources={node2: 1}", "learner.num_gpus=2"),
            ["each sampler asks 1 CPU, 0.5 GPU, 1 node2", "learner asks 1 CPU, 2 GPUs", "reward actor asks 1 CPU"],
        ),
    ],
)
def test_describe_says_what_one_actor_asks(overrides: tuple[str, ...], want: list[str]) -> None:
    # the pending-actor report names exactly this, so a user sees which request the cluster cannot meet
    asks = role_asks(cfg_with("model.size=tiny", *overrides))
    assert [describe(a) for a in asks] == want
