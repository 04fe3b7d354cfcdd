"""Monitor maths by hand: RMS latent distance, within-prompt diversity, drift matched by seed, alarm rules."""

from __future__ import annotations

import math

import pytest
import torch

from rlalign.monitor import AlarmRules, Monitor, check_alarms, cosine_distance, diversity, rms_distance


def _lat(*values: float) -> torch.Tensor:
    """One latent [1, 1, 2, 2] per value: every element equal to it."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def test_rms_distance_by_hand() -> None:
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    # row 0: sqrt(4 * 1 / 4) = 1; row 1: sqrt(4 / 4) = 1
    assert rms_distance(a, b).tolist() == pytest.approx([1.0, 1.0])
    assert rms_distance(b, b).tolist() == [0.0, 0.0]


def test_diversity_averages_pairwise_distance_per_group() -> None:
    # group 0: values 0, 1, 3 -> pairs 1, 3, 2 -> mean 2; group 1: values 5, 5 -> 0; group 2 alone: skipped
    latents = _lat(0, 1, 3, 5, 5, 9)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert diversity(latents, groups) == pytest.approx((2.0 + 0.0) / 2)
    assert math.isnan(diversity(_lat(0, 1), torch.tensor([0, 1])))  # no group with two images


def test_drift_matches_images_by_seed_and_diversity_ratio() -> None:
    mon = Monitor(AlarmRules())
    mon.set_base(torch.tensor([10, 11, 12, 13]), torch.tensor([0, 0, 1, 1]), _lat(0, 2, 0, 2))
    # same images in another order: no drift, same diversity
    same = mon.observe(0, torch.tensor([13, 12, 11, 10]), torch.tensor([1, 1, 0, 0]), _lat(2, 0, 2, 0), 0.0, {})
    assert same["monitor/drift_latent_mean"] == 0.0 and same["monitor/diversity_ratio"] == pytest.approx(1.0)
    # every image collapsed onto 1: drift 1 each, no spread left
    now = mon.observe(1, torch.tensor([10, 11, 12, 13]), torch.tensor([0, 0, 1, 1]), _lat(1, 1, 1, 1), 0.0, {})
    assert now["monitor/drift_latent_mean"] == pytest.approx(1.0)
    assert now["monitor/drift_latent_p50"] == pytest.approx(1.0) and now["monitor/drift_latent_p90"] == 1.0
    assert now["monitor/diversity_ratio"] == 0.0
    # distribution: drifts 0, 0, 0, 4 -> mean 1, p50 0, p90 = 0 + 0.7 * 4 (linear interpolation)
    d = mon.observe(2, torch.tensor([10, 11, 12, 13]), torch.tensor([0, 0, 1, 1]), _lat(0, 2, 0, 6), 0.0, {})
    assert d["monitor/drift_latent_mean"] == pytest.approx(1.0) and d["monitor/drift_latent_p50"] == 0.0
    assert d["monitor/drift_latent_p90"] == pytest.approx(2.8)


def test_cosine_distance_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, -4.0], [1.0, 0.0]])
    # same direction 0; orthogonal 1; opposite 2; 45 degrees 1 - 1/sqrt(2)
    assert cosine_distance(a, b).tolist() == pytest.approx([0.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)])


def test_feature_drift_matches_by_seed_and_survives_the_base_state_round_trip() -> None:
    mon = Monitor(AlarmRules())
    base_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mon.set_base(torch.tensor([7, 8, 9]), torch.tensor([0, 0, 0]), _lat(0, 0, 0), base_f)
    again = Monitor(AlarmRules())
    again.load_base_state(mon.base_state())  # what a resumed run reads from monitor_base.pt
    # seed 9 now points the other way (distance 2), seed 7 unchanged in direction (0), seed 8 rotated 90 (1)
    now_f = torch.tensor([[-1.0, -1.0], [5.0, 0.0], [1.0, 0.0]])
    out = again.observe(0, torch.tensor([9, 7, 8]), torch.tensor([0, 0, 0]), _lat(0, 0, 0), 0.0, {}, now_f)
    assert out["monitor/drift_feature_mean"] == pytest.approx(1.0)
    assert out["monitor/drift_feature_p50"] == pytest.approx(1.0)
    assert out["monitor/drift_feature_p90"] == pytest.approx(1.8)  # 1 + 0.8 * (2 - 1)
    no_features = again.observe(1, torch.tensor([9, 7, 8]), torch.tensor([0, 0, 0]), _lat(0, 0, 0), 0.0, {})
    assert "monitor/drift_feature_mean" not in no_features


def test_no_base_means_no_drift_metrics() -> None:
    out = Monitor().observe(0, torch.tensor([1, 2]), torch.tensor([0, 0]), _lat(0, 1), 0.0, {})
    assert "monitor/drift_latent_mean" not in out and "monitor/diversity_ratio" not in out
    assert out["monitor/diversity"] == pytest.approx(1.0) and out["monitor/alarm"] == 0.0


def _row(trained: float, audit: float, **extra: float) -> dict[str, float]:
    return {"trained": trained, "audit/judge/mean": audit, **extra}


def test_audit_drop_rule_needs_trained_up_and_audit_down_over_the_window() -> None:
    rules = AlarmRules(audit_drop=0.1, window=3)
    assert check_alarms(rules, [_row(0.0, 0.5)]) == []  # one evaluation: nothing to compare
    assert check_alarms(rules, [_row(0.0, 0.5), _row(0.2, 0.45)]) == []  # fell by 0.05 only
    (msg,) = check_alarms(rules, [_row(0.0, 0.5), _row(0.1, 0.45), _row(0.2, 0.3)])  # fell 0.2 while up 0.2
    assert "audit/judge/mean fell by 0.2000" in msg and "rose by 0.2000" in msg
    assert check_alarms(rules, [_row(0.3, 0.5), _row(0.2, 0.4), _row(0.2, 0.3)]) == []  # trained fell too
    # window 3: the 0.9 evaluation four back is outside it; first of the last three is 0.35 -> fell 0.05
    assert check_alarms(rules, [_row(0.0, 0.9), _row(0.0, 0.35), _row(0.1, 0.3), _row(0.2, 0.3)]) == []
    assert check_alarms(AlarmRules(audit_drop=0.0), [_row(0.0, 0.9), _row(1.0, 0.0)]) == []  # 0: off


def test_diversity_and_drift_rules() -> None:
    rules = AlarmRules(diversity_below=0.5, drift_above=0.3)
    low = _row(0, 0, **{"monitor/diversity_ratio": 0.4, "monitor/drift_latent_mean": 0.1})
    assert check_alarms(rules, [low]) == ["diversity is 0.400 of the base model's (< 0.5)"]
    far = _row(0, 0, **{"monitor/diversity_ratio": 0.9, "monitor/drift_latent_mean": 0.31})
    assert check_alarms(rules, [far]) == ["mean latent drift from the base model is 0.3100 (> 0.3)"]
    assert check_alarms(rules, [_row(0, 0)]) == []  # not measured (no base): no alarm
    assert check_alarms(AlarmRules(), [low, far]) == []  # defaults of the dataclass: all off


def test_observe_records_alarms_and_logs_them() -> None:
    mon = Monitor(AlarmRules(diversity_below=0.5))
    mon.set_base(torch.tensor([1, 2]), torch.tensor([0, 0]), _lat(0, 2))
    assert mon.observe(0, torch.tensor([1, 2]), torch.tensor([0, 0]), _lat(0, 2), 0.0, {})["monitor/alarm"] == 0.0
    out = mon.observe(5, torch.tensor([1, 2]), torch.tensor([0, 0]), _lat(1, 1), 0.5, {"audit/x/mean": 0.1})
    assert out["monitor/alarm"] == 1.0 and mon.fired(5) and mon.alarms[0][0] == 5
    assert mon.history[-1]["audit/x/mean"] == 0.1 and mon.history[-1]["trained"] == 0.5
    state = mon.base_state()
    again = Monitor()
    again.load_base_state(state)
    assert torch.equal(again.base_latents, mon.base_latents) and again.base_diversity == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.audit=[{name: nope}]", "eval.audit.0.name"),
        ("eval.audit=[{name: http, url: 'http://x'}]", "eval.audit.0.name"),
        ("eval.audit=[{name: jpeg, path: /x}]", "eval.audit.0.path"),
        ("eval.alarm_window=0", "eval.alarm_window"),
        ("eval.alarm_audit_drop=-1", "eval.alarm_audit_drop"),
        ("eval.alarm_drift_above=-0.5", "eval.alarm_drift_above"),
    ],
)
def test_eval_monitor_config_is_checked(override: str, key: str) -> None:
    from rlalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_audit_config_parses() -> None:
    from rlalign.config import load_config

    cfg = load_config(None, ["eval.audit=[{name: jpeg}, {name: brightness}]", "eval.stop_on_alarm=true"])
    assert [a.name for a in cfg.eval.audit] == ["jpeg", "brightness"] and cfg.eval.stop_on_alarm
