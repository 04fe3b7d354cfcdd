"""Config loading: defaults, YAML differences, dotted overrides, and errors that name the key and the file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlalign.config import (
    ConfigError,
    RunCfg,
    digits_preset_path,
    load_config,
    resources_line,
    summary,
    to_yaml,
    uses_digits_preset,
)

REPO = Path(__file__).parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if "_sd" in p.name]  # *_sd15.yaml, *_sdxl.yaml: a model dir the user provides


def test_defaults_are_the_embedded_digits_run() -> None:
    # `rlalign train` with no file (and `make demo`) runs exactly the demo it always ran: the digits preset
    cfg = load_config()
    assert isinstance(cfg, RunCfg)
    assert cfg.model.kind == "digits" and cfg.model.path is None
    assert cfg.reward.models[0].name == "digit_prompt" and len(cfg.reward.models) == 1
    assert (cfg.name, cfg.algo, cfg.iterations, cfg.time_budget_min) == ("digits", "tailorpo_g", 75, 7.0)
    assert (cfg.learner.lr, cfg.learner.micro_batch_size, cfg.learner.lr_schedule) == (3e-3, 32, "cosine")
    # 2 samplers x 4 prompts x 4 images: 32 images per iteration, rendered on both cores
    assert (cfg.sampler.num_workers, cfg.sampler.prompts_per_worker, cfg.sampler.images_per_prompt) == (2, 4, 4)
    assert (cfg.sampler.guidance_scale, cfg.sampler.batch_size, cfg.sampler.eta) == (3.0, 64, 1.0)
    # the demo's TailorPO-G layer (rlalign/presets/digits_tailorpo_g.yaml): 10 DDIM steps, step pairs only above a
    # 0.05 gap, the winner moved 0.3 sigma up the reward gradient without U-Net backprop
    assert cfg.sampler.num_steps == 10
    assert (cfg.tailorpo.tie_eps, cfg.tailorpo.eta_g, cfg.tailorpo.guidance_grad) == (0.05, 0.3, "stopgrad_eps")
    ddpo = load_config(None, ["algo=ddpo"])
    assert ddpo.sampler.num_steps == 20  # the 10-step layers are the TailorPO family's
    assert ddpo.learner.lr_schedule == "constant"  # and so is the cosine lr
    t = load_config(None, ["algo=tailorpo"])  # naming an algorithm picks its own layer, not the demo's
    assert (t.sampler.num_steps, t.tailorpo.tie_eps, t.tailorpo.eta_g, t.tailorpo.guidance_grad) == (
        10, 0.05, 0.1, "full"
    )  # fmt: skip
    assert load_config(REPO / "configs" / "tiny.yaml").algo == "tailorpo"
    assert cfg.lora.target_modules == [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"
    ]  # fmt: skip
    assert (cfg.ray.mode, cfg.eval.every, cfg.log.image_every, cfg.log.save_every) == ("async", 20, 5, 10)


def test_schema_defaults_are_neutral(tmp_path: Path) -> None:
    # a user's own model gets no demo settings: no time budget, an SD-style LoRA lr, no reward picked for them
    cfg = RunCfg()
    assert cfg.time_budget_min == 0 and cfg.learner.lr == 1e-4 and cfg.reward.models == []
    assert (cfg.ray.mode, cfg.eval.every, cfg.sampler.guidance_scale) == ("sync", 0, 7.5)
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    own = load_config(None, [f"model.path={tmp_path}", "reward.models=[{name: jpeg}]"])
    assert (own.learner.lr, own.time_budget_min, own.name, own.model.kind) == (1e-4, 0.0, "run", "auto")
    with pytest.raises(ConfigError, match=r"reward\.models"):  # the digits reward is not a silent default
        load_config(None, [f"model.path={tmp_path}"])


@pytest.mark.parametrize(
    ("kind", "path", "preset"),
    [
        ("auto", None, True),
        ("digits", None, True),
        ("digits", "/x", True),
        ("auto", "/x", False),
        ("sd15", "/x", False),
    ],
)
def test_digits_preset_applies_to_the_embedded_model_only(kind: str, path: str | None, preset: bool) -> None:
    assert uses_digits_preset(kind, path) is preset


def test_digits_preset_is_one_file_shipped_in_the_package() -> None:
    preset = digits_preset_path()
    assert preset.is_file() and preset.parent.parent == Path(__import__("rlalign").__file__).parent
    # configs/digits.yaml is the user-facing name of the same file, not a second copy
    assert (REPO / "configs" / "digits.yaml").resolve() == preset.resolve()
    # a non-editable install must carry it: setuptools package data (pyproject.toml)
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rlalign"]
    assert "presets/*.yaml" in data
    # loading the preset as a file gives the no-file defaults
    assert to_yaml(load_config(REPO / "configs" / "digits.yaml")) == to_yaml(load_config())


def test_digits_configs_build_on_the_preset() -> None:
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert (tiny.iterations, tiny.time_budget_min, tiny.ray.mode, tiny.sampler.num_steps) == (2, 0.0, "sync", 4)
    assert tiny.learner.lr == 3e-3 and tiny.reward.models[0].name == "digit_prompt"  # from the preset
    dpo = load_config(REPO / "configs" / "diffusion_dpo_digits.yaml")
    assert (dpo.learner.lr, dpo.diffusion_dpo.beta, dpo.sampler.guidance_scale) == (1e-3, 100.0, 3.0)


def test_preset_is_decided_by_file_and_overrides_together(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tmp_path}", "reward.models=[{name: jpeg}]"])
    assert cfg.learner.lr == 1e-4 and cfg.iterations == 2  # a model dir: schema defaults <- tiny.yaml
    cfg = load_config(None, [f"model.path={tmp_path}", "model.kind=digits"])  # a digits build of one's own
    assert cfg.learner.lr == 3e-3 and cfg.reward.models[0].name == "digit_prompt"


def test_eta_and_guidance_are_written_once() -> None:
    # the algorithms read the sampler's values from the rollouts; a second copy in their sections is gone
    for key in ("tailorpo.eta", "tailorpo.guidance_scale", "ddpo.eta", "ddpo.guidance_scale"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=1.0"])
    cfg = load_config(None, ["algo=ddpo", "sampler.guidance_scale=5.0"])
    assert cfg.sampler.guidance_scale == 5.0


def test_yaml_differences_and_overrides_merge(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("algo: diffusion_dpo\nsampler:\n  num_workers: 3\nlearner:\n  lr: 0.5\n")
    cfg = load_config(path, ["learner.lr=0.25", "name=x"])
    assert (cfg.algo, cfg.sampler.num_workers, cfg.learner.lr, cfg.name) == ("diffusion_dpo", 3, 0.25, "x")
    assert cfg.sampler.images_per_prompt == RunCfg().sampler.images_per_prompt  # untouched keys keep defaults


def test_typo_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("sampler:\n  num_wrokers: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "num_wrokers" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "type.yaml"
    path.write_text("learner:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "learner.lr" in str(err.value) and str(path) in str(err.value)


def test_bad_override_names_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^sampler\.eta: .*\(in command line\)$"):
        load_config(None, ["sampler.eta=high"])
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(None, ["sampler.eta"])
    # YAML that does not parse (a flow map without spaces after its colons) names the override, not a traceback
    bad = "reward.models=[{name:digit_prompt,options:{log_prob:true}}]"
    with pytest.raises(ConfigError, match=r"^reward\.models=\[\{name:digit_prompt,.*: not a valid key=value override"):
        load_config(None, ["iterations=3", bad])
    assert load_config(None, ["reward.models=[{name: digit_prompt, weight: 2.0}]"]).reward.models[0].weight == 2.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algo=ppo", "algo"),
        ("sampler.eta=0", "sampler.eta"),
        ("ray.mode=fast", "ray.mode"),
        ("model.kind=sd15", "model.path"),
        ("model.path=/does/not/exist", "model.path"),
        ("reward.target=pixels", "reward.target"),
    ],
)
def test_invalid_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # prompt files are named relative to the repository root
    overrides = [f"model.path={tmp_path}"] if path in GPU_CONFIGS else []  # validate needs an existing directory
    cfg = load_config(path, overrides)
    assert to_yaml(cfg)


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_configs_hold_only_differences(path: Path) -> None:
    # STYLE B4: a YAML file states only what differs from what it builds on (the schema, or the digits preset).
    # Exempt: `algo`, and the algorithm's own section, where GPU configs pin the papers' values on purpose (the
    # algorithm defaults are tuned on the digits model and may move).
    data = OmegaConf.to_container(OmegaConf.load(path))
    from rlalign.algos import ALGORITHMS

    section = ALGORITHMS[data.get("algo", RunCfg.algo)].cfg_key
    schema = OmegaConf.structured(RunCfg)
    merged = OmegaConf.merge(schema, data)
    base = schema
    if uses_digits_preset(merged.model.kind, merged.model.path) and path.resolve() != digits_preset_path().resolve():
        base = OmegaConf.merge(schema, OmegaConf.load(digits_preset_path()))
    base_leaves = _leaves(OmegaConf.to_container(base))
    same = [
        k
        for k, v in _leaves(data).items()
        if k in base_leaves and base_leaves[k] == v and k != "algo" and not k.startswith(section + ".")
    ]
    assert not same, f"{path.name} repeats values it already inherits: {same}"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_gpu_configs_are_marked_starting_points(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "NOT YET VALIDATED ON A GPU" in header
    monkeypatch.chdir(REPO)
    cfg = load_config(path, [f"model.path={tmp_path}"])
    assert cfg.model.kind == ("sdxl" if "_sdxl" in path.name else "sd15")
    assert cfg.sampler.dtype == "bfloat16" and cfg.sampler.num_gpus > 0 and cfg.learner.num_gpus > 0
    assert cfg.learner.dtype == ("float32" if cfg.algo.startswith("ncp_") else "bfloat16")
    if cfg.model.kind == "sdxl":
        assert cfg.learner.gradient_checkpointing and cfg.sampler.guidance_scale == 5.0
    if cfg.algo == "ddpo":  # DDPO code's values
        assert (cfg.sampler.num_steps, cfg.sampler.eta, cfg.sampler.guidance_scale) == (50, 1.0, 5.0)
        assert (cfg.learner.lr, cfg.ddpo.clip_range) == (3e-4, 1e-4)
    if cfg.algo == "diffusion_dpo":  # the original repo's beta_dpo 5000, halved by our convention
        assert cfg.diffusion_dpo.beta == 2500.0


def test_summary_counts_cpus_and_gpus() -> None:
    cfg = load_config(None, ["sampler.num_workers=4", "sampler.num_gpus=1", "learner.num_gpus=1"])
    cfg.reward.models[0].num_gpus = 0.5
    cfg.reward.models[0].num_cpus = 2
    sizes = summary(cfg)
    # samplers 4 x (1 CPU, 1 GPU) + learner (1 CPU, 1 GPU) + reward (2 CPUs, 0.5 GPU)
    assert (sizes["cpus"], sizes["gpus"]) == (7, 5.5)
    assert sizes["images_per_iteration"] == 4 * 4 * 4  # 4 samplers x the preset's 4 prompts x 4 images
    assert resources_line(cfg) == "asks Ray for 7 CPUs, 5.5 GPUs (GPUs: samplers 4 x 1 + learner 1 + rewards 0.5)"
    demo = summary(load_config())
    assert (demo["cpus"], demo["gpus"]) == (4, 0) and isinstance(demo["gpus"], int)  # 2 samplers, learner, reward


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("tailorpo.k=1", "tailorpo.k: must be >= 2, got 1"),
        ("tailorpo.min_std=0", "tailorpo.min_std: must be > 0"),
        ("tailorpo.guidance_norm=l2", "tailorpo.guidance_norm: must be one of"),
        ("dde.t_min=500 dde.t_max=100", "dde: need 0 <= t_min <= t_max"),
        ("diffusion_dpo.t_max=-1", "diffusion_dpo: need 0 <= t_min <= t_max"),
        ("ncp.layer=up", "ncp.layer: must be mid or down"),
        ("ddpo.clip_range=0", "ddpo: clip_range and adv_clip_max must be > 0"),
    ],
)
def test_algorithm_section_checks_are_config_errors(overrides: str, message: str) -> None:
    # the algorithm dataclasses' own __post_init__ checks used to escape load_config as a bare ValueError (a
    # traceback from the CLI); now they are ConfigErrors `<key>: <why>` like every other check
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides.split())
    assert str(err.value).startswith(message), str(err.value)


# one out-of-range value per section (and per numeric key where a wrong value would only fail inside an actor)
OUT_OF_RANGE = [
    ("model.kind=sd3", "model.kind"),
    ("model.attention=flash", "model.attention"),
    ("prompts.source=web", "prompts.source"),
    ("prompts.sampling=hardest", "prompts.sampling"),
    ("prompts.adaptive_floor=1.5", "prompts.adaptive_floor"),
    ("prompts.adaptive_decay=1", "prompts.adaptive_decay"),
    ("iterations=-1", "iterations"),
    ("time_budget_min=-1", "time_budget_min"),
    ("unet_rows_budget=-1", "unet_rows_budget"),
    ("lora.rank=0", "lora.rank"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.target_modules=[]", "lora.target_modules"),
    ("sampler.num_workers=0", "sampler.num_workers"),
    ("sampler.num_cpus=-1", "sampler.num_cpus"),
    ("sampler.num_gpus=1.5", "sampler.num_gpus"),
    ("sampler.prompts_per_worker=0", "sampler.prompts_per_worker"),
    ("sampler.num_steps=0", "sampler.num_steps"),
    ("sampler.eta=1.5", "sampler.eta"),
    ("sampler.guidance_scale=-1", "sampler.guidance_scale"),
    ("sampler.batch_size=0", "sampler.batch_size"),
    ("sampler.resources={GPU: 1}", "sampler.resources.GPU"),
    ("sampler.resources={node2: -1}", "sampler.resources.node2"),
    ("reward.timeout_s=0", "reward.timeout_s"),
    ("reward.models=[{name: aesthetc}]", "reward.models.0.name"),
    ("reward.models=[{name: jpeg, weight: .nan}]", "reward.models.0.weight"),
    ("reward.models=[{name: jpeg, num_gpus: -1}]", "reward.models.0.num_gpus"),
    ("reward.models=[{name: jpeg, path: /w}]", "reward.models.0.path"),
    ("reward.models=[{name: http, url: 'ftp://x'}]", "reward.models.0.url"),
    ("reward.models=[{name: http}]", "reward.models.0.url"),
    ("lora.init_from=/no/such/lora", "lora.init_from"),
    ("learner.lr=-1", "learner.lr"),
    ("learner.lr=nan", "learner.lr"),
    ("learner.weight_decay=-0.1", "learner.weight_decay"),
    ("learner.adam_eps=0", "learner.adam_eps"),
    ("learner.max_grad_norm=0", "learner.max_grad_norm"),
    ("learner.micro_batch_size=0", "learner.micro_batch_size"),
    ("learner.epochs=0", "learner.epochs"),
    ("learner.optimizer_steps=0", "learner.optimizer_steps"),
    ("learner.num_gpus=-1", "learner.num_gpus"),
    ("ray.max_policy_lag=-1", "ray.max_policy_lag"),
    ("ray.max_policy_lag=2", "ray.max_policy_lag"),  # one batch in flight: a deeper lag would silently act as 1
    ("reward.models=[{name: jpeg, replicas: 0}]", "reward.models.0.replicas"),
    ("sampler.plain_images=-1", "sampler.plain_images"),
    ("eval.features={name: jpeg}", "eval.features.name"),  # a reward without image features
    ("ray.num_cpus=0", "ray.num_cpus"),
    ("ray.call_timeout_s=0", "ray.call_timeout_s"),
    ("ray.pending_actor_timeout_s=-5", "ray.pending_actor_timeout_s"),
    ("ray.max_actor_restarts=-1", "ray.max_actor_restarts"),
    ("eval.every=-1", "eval.every"),
    ("eval.images_per_prompt=0", "eval.images_per_prompt"),
    ("log.save_every=-1", "log.save_every"),
    ("log.keep_last=-1", "log.keep_last"),
    ("tailorpo.beta=0", "tailorpo.beta"),
    ("tailorpo.ratio_clip_eps=0", "tailorpo.ratio_clip_eps"),
    ("dde.beta=-1", "dde.beta"),
    ("diffusion_dpo.beta=0", "diffusion_dpo.beta"),
    ("ncp.beta=0", "ncp.beta"),
    ("ddpo.min_std=-1", "ddpo.min_std"),
]


@pytest.mark.parametrize(("override", "key"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_config_errors_naming_the_key(override: str, key: str) -> None:
    # e.g. learner.lr=-1 used to surface as "learner placement actor died: ValueError: Invalid learning rate"
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}: "), str(err.value)


def test_adaptive_prompts_with_a_branching_algo_need_plain_renders() -> None:
    # TailorPO's final images are best-of-k searches: the plain renders are its only measure of the policy
    with pytest.raises(ConfigError, match=r"^sampler\.plain_images: prompts\.sampling=adaptive with tailorpo "):
        load_config(None, ["algo=tailorpo", "prompts.sampling=adaptive", "sampler.plain_images=0"])
    load_config(None, ["algo=ddpo", "prompts.sampling=adaptive", "sampler.plain_images=0"])  # its own images do


def test_pending_actor_timeout_has_a_default_of_a_minute() -> None:
    assert RunCfg().ray.pending_actor_timeout_s == 60.0
    assert load_config(None, ["ray.pending_actor_timeout_s=5"]).ray.pending_actor_timeout_s == 5.0


@pytest.mark.parametrize(
    ("algo", "expected"),
    [
        ("dde_stepwise", {"dde.beta": 100.0, "dde.t_min": 100, "dde.t_max": 950, "learner.lr": 1e-3}),
        ("dde_single_shot", {"dde.beta": 100.0, "dde.t_min": 0, "dde.t_max": 950, "learner.lr": 1e-3}),
        ("ncp_dpo", {"ncp.beta": 1e6, "learner.lr": 1e-3}),
        ("diffusion_dpo", {"diffusion_dpo.beta": 100.0, "learner.lr": 1e-3}),
        ("tailorpo", {"dde.beta": 1000.0, "ncp.beta": 2500.0, "learner.lr": 3e-3}),  # no layer: the demo preset
    ],
)
def test_algo_on_the_embedded_model_gets_its_calibrated_layer(
    algo: str, expected: dict[str, float], tmp_path: Path
) -> None:
    """`rlalign train algo=X` with no file: the SD-scale betas made DDE and NCP worse than the base on this model
    (docs/benchmarks.md), so the embedded model's layer for X applies; the command line still wins, and a run on
    another model never sees it."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(load_config(None, [f"algo={algo}"]))
    assert {k: OmegaConf.select(node, k) for k in expected} == pytest.approx(expected)
    assert load_config(None, [f"algo={algo}", "learner.lr=5e-4"]).learner.lr == 5e-4
    sd = load_config(None, [f"algo={algo}", f"model.path={tmp_path}", "reward.models=[{name: jpeg}]"])
    assert sd.learner.lr == RunCfg().learner.lr and sd.dde.beta == 1000.0


def test_scheduled_lr_hand_values() -> None:
    from rlalign.config import LearnerCfg
    from rlalign.learner import scheduled_lr

    const = LearnerCfg(lr=1e-3)
    assert [scheduled_lr(u, const, 5) for u in (0, 3, 9)] == [1e-3, 1e-3, 1e-3]
    cos = LearnerCfg(lr=1e-3, lr_schedule="cosine", lr_min_frac=0.1)
    # 5 iterations: p = 0, 1/4, 1/2, 3/4, 1 -> 1e-4 + 9e-4 * (1 + cos(pi p)) / 2
    got = [scheduled_lr(u, cos, 5) for u in range(7)]
    want = [1e-3, 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - math.sqrt(0.5)) / 2, 1e-4]
    assert got[:5] == pytest.approx(want, rel=1e-12) and got[5:] == pytest.approx([1e-4, 1e-4])  # held after the end
    warm = LearnerCfg(lr=1e-3, lr_schedule="cosine", lr_min_frac=0.0, warmup_iterations=2)
    assert [scheduled_lr(u, warm, 5) for u in range(5)] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 0.0], abs=1e-15)
    one = LearnerCfg(lr=1e-3, lr_schedule="cosine")  # a single planned iteration trains at the peak
    assert (scheduled_lr(0, one, 1), scheduled_lr(1, one, 1)) == pytest.approx((1e-3, 1e-4))
