"""Typed run configuration: dataclasses are the schema and the defaults; YAML files hold differences only.

`load_config(path, overrides)` merges `RunCfg()` <- [digits preset] <- YAML file <- `a.b=value` overrides with
OmegaConf's structured mode, so an unknown key or a wrong type fails at load with a message naming the key and the
file. The schema defaults are neutral starting values for a user's own model. The settings calibrated for the
embedded digits model (the demo: `rlalign train` with no file) live in one file, `rlalign/presets/digits.yaml`
(`configs/digits.yaml` links to it); that layer applies whenever a run uses the embedded model (model.kind=digits,
or model.kind=auto without model.path), so `configs/tiny.yaml` and `configs/diffusion_dpo_digits.yaml` build on it.
Algorithm sections are the dataclasses that live beside each algorithm in `rlalign/algos/` (one typed section per
method; a method reads only its own section).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlalign.algos.dde import DDECfg
from rlalign.algos.ddpo import DDPOCfg
from rlalign.algos.diffusion_dpo import DiffusionDPOCfg
from rlalign.algos.ncp import NCPCfg
from rlalign.algos.tailorpo import TailorPOCfg


class ConfigError(ValueError):
    """A configuration problem, with the key and the file that caused it in the message."""


# the embedded digits model's settings (package data, so an installed wheel finds it; configs/digits.yaml links here)
DIGITS_PRESET = "presets/digits.yaml"


@dataclass
class ModelCfg:
    # auto: the layout of `path` decides (text_encoder_2 -> sdxl, else sd15); no path -> the embedded digits model.
    # digits | sd15 | sdxl name it explicitly (checked against the directory's layout).
    kind: str = "auto"
    path: str | None = None  # local diffusers pipeline dir; None uses the cached embedded digits model
    cache_dir: str | None = None  # where the embedded model is built; None: $RLALIGN_CACHE or ~/.cache/rlalign
    size: str = "default"  # embedded digits model size: default | tiny (seconds to build; tests)
    device: str = "auto"  # auto (cuda if the actor holds a GPU, else cpu) | cpu | cuda
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | eager (diffusers' plain AttnProcessor)
    vae_slicing: bool = False  # decode one image at a time (less peak memory at large batch)
    vae_tiling: bool = False  # decode in tiles (SDXL at 1024 px on small GPUs)
    compile: bool = False  # torch.compile the U-Net (opt-in: minutes of compile on the first calls)
    tf32: bool = True  # allow TF32 matmuls/convolutions on Ampere+ GPUs (no effect on CPU)


@dataclass
class LoraCfg:
    rank: int = 16
    alpha: float = 16.0  # scale = alpha / rank; kept exactly by the diffusers export
    # a LoRA trained elsewhere (peft or diffusers format: a directory with a *.safetensors, or the file) that seeds
    # the run instead of a fresh one; None starts from B = 0 (policy == reference)
    init_from: str | None = None
    # U-Net modules that get adapters: the attention projections, the usual choice for SD LoRAs (the digits preset
    # adds the transformer blocks' proj_in/proj_out/feed-forward layers: attention alone is weak there)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class PromptsCfg:
    source: str = "digits"  # digits (all digits x templates) | file (one prompt per line)
    path: str | None = None  # prompt file for source=file
    eval_path: str | None = None  # held-out prompts for evaluation (source=file); None reuses the training prompts


@dataclass
class SamplerCfg:
    num_workers: int = 1  # sampler actors
    num_cpus: float = 1.0  # per sampler actor
    num_gpus: float = 0.0  # per sampler actor; 0 keeps it on CPU
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {node2: 1}
    prompts_per_worker: int = 8  # groups per sampler call
    images_per_prompt: int = 4  # group size; pairs and advantages form inside a group
    num_steps: int = 20  # DDIM steps
    eta: float = 1.0  # DDIM eta; > 0 so every step has a log-probability
    # classifier-free guidance w (diffusers' SD default; SDXL usually 5.0). The learner reads the rollout's own eta
    # and w, so each is written once, here.
    guidance_scale: float = 7.5
    batch_size: int = 16  # U-Net rows per forward inside a sampler call (memory bound)
    # weights of the sampler's U-Net, VAE and text encoders: float32 | bfloat16 | float16. Log-probs, DDIM maths and
    # everything kept in the rollout stay float32 whatever this says.
    dtype: str = "float32"


@dataclass
class RewardSpec:
    name: str = MISSING  # registered reward name (reward_servers.registry), e.g. digit_prompt, jpeg, aesthetic, http
    weight: float = 1.0
    path: str | None = None  # local weights dir (digit_prompt: None uses the embedded model's classifier)
    url: str | None = None  # for name=http: base URL of a reward server
    token: str | None = None  # bearer token for name=http
    normalize: str = "none"  # none | running | group
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the model


@dataclass
class RewardCfg:
    models: list[RewardSpec] = field(default_factory=list)  # at least one; the digits preset uses digit_prompt
    # what TailorPO's step-wise reward looks at: x0_hat (one-step prediction), noisy (x_{t-1} itself), final
    target: str = "x0_hat"
    timeout_s: float = 120.0  # a reward call slower than this is an error naming the reward


@dataclass
class LearnerCfg:
    # AdamW lr for the LoRA parameters: a common LoRA starting value (the digits preset's small U-Net takes 3e-3)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8  # training rows per forward/backward; losses are averaged exactly over the batch
    epochs: int = 1  # passes over each iteration's batch
    optimizer_steps: int = 1  # optimiser steps per pass (the batch is split into this many shuffled chunks)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    # frozen base U-Net weights: float32 | bfloat16 | float16 (GradScaler). The LoRA parameters, their gradients and
    # AdamW's state always stay float32; the forward runs under autocast in this dtype. NCP needs float32 here.
    dtype: str = "float32"
    gradient_checkpointing: bool = False  # recompute U-Net activations in backward: less memory, ~30 % slower


@dataclass
class RayCfg:
    address: str | None = None  # None: start an embedded local Ray; "auto" or ray://host:port joins a cluster
    mode: str = "sync"  # sync (on-policy) | async (samplers render iteration k+1 while the learner trains on k)
    max_policy_lag: int = 1  # async: a rollout may be at most this many LoRA versions behind
    num_cpus: int | None = None  # embedded Ray: CPUs to offer (None: the machine's)
    include_dashboard: bool = False
    placement_strategy: str = "PACK"  # PACK | SPREAD for the sampler placement group
    call_timeout_s: float = 600.0  # an actor call slower than this is reported as a dead/hung actor
    # an actor still pending after this is reported with what it asked for (rlalign/resources.py); on an
    # autoscaling cluster the report says it is waiting for nodes
    pending_actor_timeout_s: float = 60.0
    # a sampler or reward actor that dies is restarted and its request re-run; one that dies more often than
    # this ends the run (its node keeps failing). 0: no restarts, the first death ends the run
    max_actor_restarts: int = 3


@dataclass
class EvalCfg:
    every: int = 0  # also evaluate every N iterations (0: only before and after training): points on the curve
    images_per_prompt: int = 5  # held-out images per eval prompt (digits: 40 prompts x 5 = 200 images)
    # eval seeds start here, above every training seed (run seed * 1_000_003 + images; 10_000_000 collided at seed 10)
    seed: int = 1 << 62


@dataclass
class LogCfg:
    image_every: int = 20  # image grid every N iterations (0: never)
    save_every: int = 50  # checkpoint every N iterations (0: only at the end)
    keep_last: int = 3  # checkpoints kept
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlalign"


@dataclass
class RunCfg:
    name: str = "run"  # run directory name under out_dir
    out_dir: str = "runs"
    seed: int = 0
    iterations: int = 100
    # stop after the iteration that crosses this many minutes of training (0: no limit); eval and save still run
    time_budget_min: float = 0.0
    algo: str = "tailorpo"  # a name from rlalign.algos.ALGORITHMS
    resume: str | None = None  # None | latest | a checkpoint directory
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    prompts: PromptsCfg = field(default_factory=PromptsCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    reward: RewardCfg = field(default_factory=RewardCfg)
    learner: LearnerCfg = field(default_factory=LearnerCfg)
    ray: RayCfg = field(default_factory=RayCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    tailorpo: TailorPOCfg = field(default_factory=TailorPOCfg)
    dde: DDECfg = field(default_factory=DDECfg)
    diffusion_dpo: DiffusionDPOCfg = field(default_factory=DiffusionDPOCfg)
    ncp: NCPCfg = field(default_factory=NCPCfg)
    ddpo: DDPOCfg = field(default_factory=DDPOCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("auto", "digits", "sd15", "sdxl"),
    "model.size": ("default", "tiny"),
    "model.device": ("auto", "cpu", "cuda"),
    "model.attention": ("sdpa", "eager"),
    "sampler.dtype": ("float32", "bfloat16", "float16"),
    "learner.dtype": ("float32", "bfloat16", "float16"),
    "prompts.source": ("digits", "file"),
    "reward.target": ("x0_hat", "noisy", "final"),
    "ray.mode": ("sync", "async"),
    "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> RunCfg:
    """Defaults <- digits preset (embedded model only) <- YAML file <- `a.b=value` overrides, then `validate`.

    Raises ConfigError naming the bad key and its source. The preset layer is decided by the file and overrides
    together (see `uses_digits_preset`), so `rlalign train model.path=/models/sd15` gets the neutral defaults.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command-line override {bad[0]!r} must look like key.sub=value")
    layers: list[tuple[Any, str]] = []
    if path is not None:
        layers.append((_load_yaml(Path(path)), str(path)))
    if overrides:
        layers.append((OmegaConf.from_dotlist(list(overrides)), "command line"))
    schema = OmegaConf.structured(RunCfg)
    merged = _merge_layers(schema, layers)
    if uses_digits_preset(merged.model.kind, merged.model.path):
        preset = _merge(schema, _load_yaml(digits_preset_path()), source=str(digits_preset_path()))
        merged = _merge_layers(preset, layers)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RunCfg)
    validate(cfg)
    return cfg


def uses_digits_preset(kind: str, path: str | None) -> bool:
    """The digits preset applies to runs on the embedded digits model: kind digits, or kind auto without a path."""
    return kind == "digits" or (kind == "auto" and not path)


def digits_preset_path() -> Path:
    """`rlalign/presets/digits.yaml` inside the installed package (editable or not)."""
    return Path(str(resources.files("rlalign").joinpath(DIGITS_PRESET)))


def _merge_layers(base: Any, layers: Sequence[tuple[Any, str]]) -> Any:
    for update, source in layers:
        base = _merge(base, update, source=source)
    return base


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types; all mean the same to the user
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err


def _merge(base: Any, update: Any, *, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: bad config key {key!r}: {reason}") from err


def validate(cfg: RunCfg) -> None:
    """Check values the type system cannot; raise ConfigError naming the key."""
    from rlalign.algos import ALGORITHMS  # here, not at module top: keeps import order simple for algos

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config key {key!r}: {msg}")

    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in allowed:
            fail(key, f"got {value!r}, expected one of {', '.join(allowed)}")
    if cfg.algo not in ALGORITHMS:
        fail("algo", f"unknown algorithm {cfg.algo!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    if cfg.iterations < 0:
        fail("iterations", "must be >= 0")
    # the model first: an SD config without its directory should say that, not complain about later keys
    if cfg.model.kind in ("sd15", "sdxl") and not cfg.model.path:
        fail("model.path", f"model.kind={cfg.model.kind} needs a local diffusers directory in model.path")
    if cfg.model.path and not Path(cfg.model.path).expanduser().is_dir():
        fail("model.path", f"directory {cfg.model.path} does not exist (rlalign never downloads weights)")
    s = cfg.sampler
    for key, value in (
        ("sampler.num_workers", s.num_workers),
        ("sampler.prompts_per_worker", s.prompts_per_worker),
        ("sampler.images_per_prompt", s.images_per_prompt),
        ("sampler.num_steps", s.num_steps),
        ("learner.micro_batch_size", cfg.learner.micro_batch_size),
        ("lora.rank", cfg.lora.rank),
    ):
        if value < 1:
            fail(key, f"must be >= 1, got {value}")
    if s.eta <= 0:
        fail("sampler.eta", f"must be > 0 so every DDIM step has a log-probability, got {s.eta}")
    algo = ALGORITHMS[cfg.algo]
    if not algo.needs_step_pairs and s.images_per_prompt < 2:
        fail("sampler.images_per_prompt", f"{cfg.algo} pairs or normalises inside a group: need >= 2")
    if not cfg.reward.models:
        fail("reward.models", "at least one reward model is needed")
    for i, spec in enumerate(cfg.reward.models):
        if spec.normalize not in ("none", "running", "group"):
            fail(f"reward.models.{i}.normalize", f"got {spec.normalize!r}, expected none, running or group")
        if spec.name == "http" and not spec.url:
            fail(f"reward.models.{i}.url", "a reward with name=http needs url (e.g. http://127.0.0.1:8000)")
    if cfg.algo.startswith("ncp_") and cfg.learner.dtype != "float32":
        fail(
            "learner.dtype",
            f"{cfg.algo} compares two close latents in the U-Net's embedding space; in {cfg.learner.dtype} most "
            "elements round to the same value (docs/precision.md). Use learner.dtype=float32 (sampler.dtype may stay "
            "low precision)",
        )
    if cfg.lora.init_from and not Path(cfg.lora.init_from).expanduser().exists():
        fail("lora.init_from", f"{cfg.lora.init_from} does not exist (a LoRA directory or .safetensors file)")
    if cfg.prompts.source == "file" and not (cfg.prompts.path and Path(cfg.prompts.path).is_file()):
        fail("prompts.path", f"prompts.source=file needs an existing prompt file, got {cfg.prompts.path!r}")
    if cfg.ray.max_policy_lag < 0:
        fail("ray.max_policy_lag", "must be >= 0")


def to_yaml(cfg: RunCfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunCfg, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def summary(cfg: RunCfg) -> dict[str, int | float]:
    """Derived sizes and the resources the run asks Ray for, printed at start-up.

    cpus/gpus: sampler workers x their share + the learner + one actor per reward model (what `rlalign.actors`
    requests); a fractional GPU share (e.g. 0.5 per reward) counts as that fraction.
    """
    s, learner, rewards = cfg.sampler, cfg.learner, cfg.reward.models
    per_call = s.prompts_per_worker * s.images_per_prompt
    return {
        "images_per_sampler_call": per_call,
        "images_per_iteration": per_call * s.num_workers,
        "groups_per_iteration": s.prompts_per_worker * s.num_workers,
        "cpus": _count(s.num_workers * s.num_cpus + learner.num_cpus + sum(m.num_cpus for m in rewards)),
        "gpus": _count(s.num_workers * s.num_gpus + learner.num_gpus + sum(m.num_gpus for m in rewards)),
    }


def resources_line(cfg: RunCfg) -> str:
    """`asks Ray for 6 CPUs, 5.5 GPUs (GPUs: samplers 4 x 1 + learner 1 + rewards 0.5)`, from `summary`."""
    totals, s = summary(cfg), cfg.sampler
    reward_gpus = _count(sum(m.num_gpus for m in cfg.reward.models))
    return (
        f"asks Ray for {totals['cpus']} CPUs, {totals['gpus']} GPUs (GPUs: samplers {s.num_workers} x "
        f"{_count(s.num_gpus)} + learner {_count(cfg.learner.num_gpus)} + rewards {reward_gpus})"
    )


def _count(x: float) -> int | float:
    """Whole numbers print as ints (2, not 2.0); fractions keep up to 3 decimals."""
    return round(x) if abs(x - round(x)) < 1e-9 else round(x, 3)
