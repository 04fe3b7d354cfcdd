"""Typed run configuration: dataclasses are the schema and the defaults; YAML files hold differences only.

`load_config(path, overrides)` merges `RunCfg()` <- [digits preset] <- YAML file <- `a.b=value` overrides with
OmegaConf's structured mode, so an unknown key or a wrong type fails at load with a message naming the key and the
file. The schema defaults are neutral starting values for a user's own model. The settings calibrated for the
embedded digits model (the demo: `rlalign train` with no file) live in one file, `rlalign/presets/digits.yaml`
(`configs/digits.yaml` links to it); that layer applies whenever a run uses the embedded model (model.kind=digits,
or model.kind=auto without model.path), so `configs/tiny.yaml` builds on it. An algorithm whose settings on this
model differ (beta, t range, lr) has its own layer on top, `rlalign/presets/digits_<algo>.yaml`
(`configs/<algo>_digits.yaml` link to them), so `rlalign train algo=X` runs X's calibrated settings.
Algorithm sections are the dataclasses that live beside each algorithm in `rlalign/algos/` (one typed section per
method; a method reads only its own section).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Iterator, Sequence
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
    """A configuration problem: the message is `<key>: <why>` (and the file or "command line" it came from)."""


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
    # which training prompt each group gets: uniform (a shuffled walk through the list, every prompt once per
    # epoch) | adaptive (drawn more often where the policy's own reward is lowest: rlalign/prompts.py PromptRewards)
    sampling: str = "uniform"
    # adaptive: this fraction of the draw stays uniform, so no prompt starves; the rest follows the reward gaps
    adaptive_floor: float = 0.5
    # adaptive: weight of a prompt's old running reward when a new one arrives (0 = only the latest); 0.5 was too
    # noisy on the digits demo with one plain render per prompt per draw, 0.8 worked (docs/benchmarks.md)
    adaptive_decay: float = 0.8


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
    # branching algorithms (TailorPO, TailorPO-G) train on best-of-k searches, whose reward says little about the
    # policy itself: each sampler call also renders this many of its images plainly (no branching, same prompt and
    # seed) and logs their reward as plain/weighted/mean (0: off; costs these images' U-Net rows, counted in cost/*)
    plain_images: int = 4


@dataclass
class RewardSpec:
    name: str = MISSING  # registered reward name (reward_servers.registry), e.g. digit_prompt, jpeg, aesthetic, http
    weight: float = 1.0
    path: str | None = None  # local weights dir (digit_prompt: None uses the embedded model's classifier)
    url: str | None = None  # for name=http: base URL of a reward server
    # name=http: the bearer token, given one way of three. token_env (the name of an environment variable) or
    # token_file (a file holding the token) are the recommended ones: `preflight` reads them on the driver, and a
    # saved config keeps only the name or path. A plain token works but is redacted wherever the config is printed
    # or saved, so a run resumed from its config.yaml needs it again (see `redacted`).
    token_env: str | None = None
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)
    normalize: str = "none"  # none | running | group
    # actors serving this model, each with num_cpus/num_gpus; a batch is split over them (rlalign/actors.py
    # RayRewardHandle). More replicas when a reward is the slowest stage (reward_util/<name> near 1)
    replicas: int = 1
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
    # lr over the run's updates (one per iteration): constant, or cosine from lr down to lr * lr_min_frac at the
    # last planned iteration (`iterations`; a run stopped earlier by a budget ends above the minimum); after
    # `warmup_iterations` of linear warm-up in either case. A pure function of the update count: resumes exactly
    lr_schedule: str = "constant"
    lr_min_frac: float = 0.1
    warmup_iterations: int = 0
    # learner actors in one torch.distributed group (gloo on CPU, NCCL on GPU): each runs a share of every chunk's
    # micro-batches, gradients are summed, same LoRA as one learner (docs/cluster.md); num_cpus etc. are per learner
    num_workers: int = 1
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
    max_policy_lag: int = 1  # async: 1 = one batch in flight (rollouts 1 LoRA version behind); 0 = no overlap
    num_cpus: int | None = None  # embedded Ray: CPUs to offer (None: the machine's)
    include_dashboard: bool = False
    placement_strategy: str = "PACK"  # PACK | SPREAD for the sampler placement group
    call_timeout_s: float = 600.0  # an actor call slower than this is reported as a dead/hung actor
    # an actor still pending after this is reported with what it asked for (rlalign/resources.py); on an
    # autoscaling cluster the report says it is waiting for nodes
    pending_actor_timeout_s: float = 60.0
    # the cluster adds nodes on demand (Ray autoscaler): resources it lacks at start are waited for, up to
    # pending_actor_timeout_s (raise it to the autoscaler's node start time), instead of refused at once
    autoscaling: bool = False
    # a sampler or reward actor that dies is restarted and its request re-run; one that dies more often than
    # this ends the run (its node keeps failing). 0: no restarts, the first death ends the run
    max_actor_restarts: int = 3


@dataclass
class EvalCfg:
    every: int = 0  # also evaluate every N iterations (0: only before and after training): points on the curve
    images_per_prompt: int = 5  # held-out images per eval prompt (digits: 40 prompts x 5 = 200 images)
    # eval seeds start here, above every training seed (run seed * 1_000_003 + images; 10_000_000 collided at seed 10)
    seed: int = 1 << 62
    # reward models scored on the held-out images but never trained on (same schema as reward.models), logged as
    # audit/<name>/mean; built in the driver's process on CPU (cheap ones: brightness, jpeg, digit_prompt). The
    # digits model's independent judge is always logged as audit/judge/mean. Monitor maths: rlalign/monitor.py
    audit: list[RewardSpec] = field(default_factory=list)
    # an image-feature model (clip_score, aesthetic, hpsv2, pickscore, digit_prompt: any reward with image features)
    # in whose space the monitor also measures drift from the base model (monitor/drift_feature_*); None: latents only
    features: RewardSpec | None = None
    alarm_audit_drop: float = 0.1  # an audit mean falls by more than this while the trained reward rises (0: off)
    alarm_window: int = 3  # ... measured from the first to the last of the last N evaluations
    alarm_diversity_below: float = 0.2  # within-prompt diversity below this fraction of the base model's (0: off)
    alarm_drift_above: float = 0.0  # mean RMS latent distance from the base model's images above this (0: off)
    stop_on_alarm: bool = False  # an alarm at an evaluation saves a checkpoint and stops the run


@dataclass
class LogCfg:
    image_every: int = 20  # image grid every N iterations (0: never)
    save_every: int = 50  # checkpoint every N iterations (0: only at the end)
    keep_last: int = 3  # checkpoints kept
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlalign"


@dataclass
class PrefColumnsCfg:
    """Column names of a preference table; Pick-a-Pic v2's by default (rlalign/offline/prefs.py)."""

    caption: str = "caption"
    image_0: str = "jpg_0"  # image bytes (JPEG/PNG) or a path relative to the table file
    image_1: str = "jpg_1"
    label_0: str = "label_0"  # 1 = image_0 preferred; 0.5/0.5 = tie
    label_1: str = "label_1"


@dataclass
class DataCfg:
    """Offline preference pairs (docs/offline.md): read, decoded and VAE-encoded with Ray Data, cached as latents."""

    preferences: str | None = None  # a .parquet file or directory of shards, or .jsonl; None: online pairs only
    columns: PrefColumnsCfg = field(default_factory=PrefColumnsCfg)
    ties: str = "drop"  # drop | keep (a tie is trained in both orders: its margin is pulled towards 0)
    pairs_per_iteration: int = 16  # offline pairs in each learner update (offline only)
    # share of each update's pairs that come from online samplers. 0: offline only (the samplers only render the
    # held-out evaluation). f > 0: the samplers render their usual G groups (one best-vs-worst pair each) and
    # round(G * (1 - f) / f) offline pairs join them, so a run can start from human data and continue online
    online_fraction: float = 0.0
    cache_dir: str | None = None  # encoded latents + text embeddings; None: <out_dir>/prefs_cache
    encode_workers: int = 1  # Ray Data actors that VAE-encode (each loads the VAE and text encoders)
    encode_num_gpus: float = 0.0  # per encode actor
    encode_batch_size: int = 16  # rows per Ray Data batch
    max_pairs: int = 0  # use only the first N rows of the table (0: all)


@dataclass
class RunCfg:
    name: str = "run"  # run directory name under out_dir
    out_dir: str = "runs"
    seed: int = 0
    iterations: int = 100
    # stop after the iteration that crosses this many minutes of training (0: no limit); eval and save still run
    time_budget_min: float = 0.0
    # stop after the iteration that crosses this many U-Net rows (cost/unet_rows summed: sampling, branching and
    # training; evaluation not counted; 0: no limit). A compute budget that, unlike minutes, is the same on any
    # machine and load: benchmarks/algorithms.py compares algorithms at equal cost with it
    unet_rows_budget: int = 0
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
    data: DataCfg = field(default_factory=DataCfg)

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
    "prompts.sampling": ("uniform", "adaptive"),
    "reward.target": ("x0_hat", "noisy", "final"),
    "ray.mode": ("sync", "async"),
    "learner.lr_schedule": ("constant", "cosine"),
    "ray.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "data.ties": ("drop", "keep"),
}


def _parse_overrides(overrides: Sequence[str]) -> Any:
    """`a.b=value` strings -> one OmegaConf layer; a value YAML cannot read is a ConfigError naming its override
    (YAML flow maps need a space after each colon: `reward.models=[{name: digit_prompt, weight: 1.0}]`)."""
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception:  # yaml's ScannerError/ParserError, OmegaConf's key grammar errors: find the culprit
        for override in overrides:
            try:
                OmegaConf.from_dotlist([override])
            except Exception as err:
                why = " ".join(str(err).split())
                raise ConfigError(f"{override}: not a valid key=value override ({why})") from None
        raise


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> RunCfg:
    """Defaults <- digits preset (embedded model only; then its layer for the run's algorithm, if there is one:
    the algorithm the file or the overrides name, else the preset's own) <- YAML file <- `a.b=value` overrides,
    then `validate`.

    Raises ConfigError naming the bad key and its source. The preset layer is decided by the file and overrides
    together (see `uses_digits_preset`), so `rlalign train model.path=/models/sd15` gets the neutral defaults.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]}: a command-line override must look like key.sub=value")
    layers: list[tuple[Any, str]] = []
    if path is not None:
        layers.append((_load_yaml(Path(path)), str(path)))
    if overrides:
        layers.append((_parse_overrides(overrides), "command line"))
    schema = OmegaConf.structured(RunCfg)
    merged = _merge_layers(schema, layers)
    if uses_digits_preset(merged.model.kind, merged.model.path):
        preset = _merge(schema, _load_yaml(digits_preset_path()), source=str(digits_preset_path()))
        # the demo's algorithm is the preset's unless the file or the command line names one
        named = any(OmegaConf.select(layer, "algo", default=None) is not None for layer, _ in layers)
        for_algo = digits_preset_path(merged.algo if named else preset.algo)  # its calibrated layer, if any
        if for_algo.is_file():
            preset = _merge(preset, _load_yaml(for_algo), source=str(for_algo))
        merged = _merge_layers(preset, layers)
    cfg = _to_object(merged)
    validate(cfg)
    return cfg


def _to_object(merged: Any) -> RunCfg:
    """Build the dataclasses; a section's own `__post_init__` check (e.g. tailorpo.k >= 2) becomes a ConfigError.

    Each section is built alone first, so the error names the section even when the message does not.
    """
    for name in RunCfg.__dataclass_fields__:
        node = merged[name]
        if not OmegaConf.is_dict(node):
            continue
        try:
            OmegaConf.to_object(node)
        except ValueError as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            head, sep, rest = text.partition(" ")
            if head.startswith(name + ".") and sep:  # "tailorpo.k must be >= 2, got 1"
                raise ConfigError(f"{head}: {rest}") from err
            raise ConfigError(f"{name}: {text.removeprefix(name + ':').strip()}") from err
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, RunCfg)
    return cfg


def uses_digits_preset(kind: str, path: str | None) -> bool:
    """The digits preset applies to runs on the embedded digits model: kind digits, or kind auto without a path."""
    return kind == "digits" or (kind == "auto" and not path)


def digits_preset_path(algo: str | None = None) -> Path:
    """`rlalign/presets/digits.yaml` inside the installed package (editable or not); with `algo`, that algorithm's
    layer on top of it, `rlalign/presets/digits_<algo>.yaml` (its beta, t range, lr calibrated on the digits model:
    `rlalign train algo=dde_stepwise` must not run SD-scale settings that make this model worse)."""
    name = DIGITS_PRESET if algo is None else DIGITS_PRESET.replace(".yaml", f"_{algo}.yaml")
    return Path(str(resources.files("rlalign").joinpath(name)))


def _merge_layers(base: Any, layers: Sequence[tuple[Any, str]]) -> Any:
    for update, source in layers:
        base = _merge(base, update, source=source)
    return base


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file: {path} does not exist")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors come in several types; all mean the same to the user
        raise ConfigError(f"config file: {path} is not valid YAML: {str(err).splitlines()[0]}") from err


def _merge(base: Any, update: Any, *, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {reason} (in {source})") from err


# numeric ranges, per section: key -> rule (">= 0", "> 0", ">= 1"); None values (optional keys) are not checked.
# Every value must also be finite. Choices are in _CHOICES; cross-key rules in `validate`.
_RANGES: dict[str, str] = {
    "iterations": ">= 0",
    "time_budget_min": ">= 0",
    "unet_rows_budget": ">= 0",
    "lora.rank": ">= 1",
    "lora.alpha": "> 0",
    "sampler.num_workers": ">= 1",
    "sampler.num_cpus": ">= 0",
    "sampler.num_gpus": ">= 0",
    "sampler.prompts_per_worker": ">= 1",
    "prompts.adaptive_floor": "in [0, 1]",
    "prompts.adaptive_decay": "in [0, 1)",
    "sampler.plain_images": ">= 0",
    "sampler.images_per_prompt": ">= 1",
    "sampler.num_steps": ">= 1",
    "sampler.guidance_scale": ">= 0",
    "sampler.batch_size": ">= 1",
    "reward.timeout_s": "> 0",
    "learner.lr": "> 0",
    "learner.weight_decay": ">= 0",
    "learner.adam_eps": "> 0",
    "learner.max_grad_norm": "> 0",
    "learner.micro_batch_size": ">= 1",
    "learner.epochs": ">= 1",
    "learner.optimizer_steps": ">= 1",
    "learner.lr_min_frac": "in [0, 1]",
    "learner.warmup_iterations": ">= 0",
    "learner.num_workers": ">= 1",
    "learner.num_cpus": ">= 0",
    "learner.num_gpus": ">= 0",
    "ray.max_policy_lag": ">= 0",
    "ray.num_cpus": ">= 1",
    "ray.call_timeout_s": "> 0",
    "ray.pending_actor_timeout_s": "> 0",
    "ray.max_actor_restarts": ">= 0",
    "eval.every": ">= 0",
    "eval.images_per_prompt": ">= 1",
    "eval.seed": ">= 0",
    "eval.alarm_audit_drop": ">= 0",
    "eval.alarm_window": ">= 1",
    "eval.alarm_diversity_below": ">= 0",
    "eval.alarm_drift_above": ">= 0",
    "log.image_every": ">= 0",
    "log.save_every": ">= 0",
    "log.keep_last": ">= 0",
    "tailorpo.beta": "> 0",
    "tailorpo.tie_eps": ">= 0",
    "tailorpo.ratio_clip_eps": "> 0",
    "tailorpo.eta_g": ">= 0",
    "dde.beta": "> 0",
    "dde.min_reward_gap": ">= 0",
    "diffusion_dpo.beta": "> 0",
    "diffusion_dpo.min_reward_gap": ">= 0",
    "ncp.beta": "> 0",
    "ncp.cpo_nll_weight": ">= 0",
    "ncp.min_reward_gap": ">= 0",
    "ddpo.min_std": ">= 0",
    "data.pairs_per_iteration": ">= 1",
    "data.encode_workers": ">= 1",
    "data.encode_num_gpus": ">= 0",
    "data.encode_batch_size": ">= 1",
    "data.max_pairs": ">= 0",
}
_RULES = {
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


def validate(cfg: RunCfg) -> None:
    """Check values the type system cannot, section by section; raise ConfigError `<key>: <why>`.

    Only the values themselves: the files a config names are opened by `preflight`, before Ray starts.
    """
    from reward_servers.registry import REWARDS
    from rlalign.algos import ALGORITHMS  # here, not at module top: keeps import order simple for algos

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    node = OmegaConf.structured(cfg)
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(node, key)
        if value not in allowed:
            fail(key, f"got {value!r}, expected one of {', '.join(allowed)}")
    if cfg.algo not in ALGORITHMS:
        fail("algo", f"unknown algorithm {cfg.algo!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    if cfg.ray.max_policy_lag > 1:  # would silently act as 1: say so instead
        fail(
            "ray.max_policy_lag",
            f"got {cfg.ray.max_policy_lag}; the async loop keeps one batch in flight, so rollouts are at most 1 "
            "version behind: use 1 (async overlap) or 0 (no overlap)",
        )
    # the model first: an SD config without its directory should say that, not complain about later keys
    if cfg.model.kind in ("sd15", "sdxl") and not cfg.model.path:
        fail("model.path", f"model.kind={cfg.model.kind} needs a local diffusers directory in model.path")
    if cfg.model.path and not Path(cfg.model.path).expanduser().is_dir():
        fail("model.path", f"directory {cfg.model.path} does not exist (rlalign never downloads weights)")
    s = cfg.sampler
    if not (0 < s.eta <= 1):  # eta = 1 is DDPM's variance; above it the step is not a DDIM process
        fail("sampler.eta", f"must be in (0, 1] so every DDIM step has a log-probability, got {s.eta}")
    for key, rule in _RANGES.items():
        value = OmegaConf.select(node, key)
        if value is not None and not (math.isfinite(value) and _RULES[rule](value)):
            fail(key, f"must be {rule}, got {value}")
    if not cfg.name:
        fail("name", "must be a non-empty directory name")
    _check_actor_resources("sampler", s.num_cpus, s.num_gpus, s.resources)
    _check_actor_resources("learner", cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources)
    if not cfg.lora.target_modules:
        fail("lora.target_modules", "at least one U-Net module name is needed (e.g. to_q)")
    algo = ALGORITHMS[cfg.algo]
    if not algo.needs_step_pairs and s.images_per_prompt < 2:
        fail("sampler.images_per_prompt", f"{cfg.algo} pairs or normalises inside a group: need >= 2")
    if cfg.prompts.sampling == "adaptive" and algo.needs_step_pairs and s.plain_images < 1:
        # a branching algorithm's own images are searches: only the plain renders measure the policy
        fail(
            "sampler.plain_images", f"prompts.sampling=adaptive with {cfg.algo} steers by its plain renders: need >= 1"
        )
    if not cfg.reward.models:
        fail("reward.models", "at least one reward model is needed")
    for i, spec in enumerate(cfg.reward.models):
        key = f"reward.models.{i}"
        if spec.name not in REWARDS:
            fail(f"{key}.name", f"unknown reward {spec.name!r}; known: {', '.join(sorted(REWARDS))}")
        if spec.normalize not in ("none", "running", "group"):
            fail(f"{key}.normalize", f"got {spec.normalize!r}, expected none, running or group")
        if not math.isfinite(spec.weight):
            fail(f"{key}.weight", f"must be finite, got {spec.weight}")
        _check_actor_resources(key, spec.num_cpus, spec.num_gpus, {})
        if spec.replicas < 1:
            fail(f"{key}.replicas", f"must be >= 1, got {spec.replicas}")
        if spec.name == "http" and not spec.url:
            fail(f"{key}.url", "a reward with name=http needs url (e.g. http://127.0.0.1:8000)")
        if spec.url and not spec.url.startswith(("http://", "https://")):
            fail(f"{key}.url", f"must start with http:// or https://, got {spec.url!r}")
        _check_token_keys(key, spec)
        if spec.path is not None and not REWARDS[spec.name].weights:
            fail(f"{key}.path", f"reward {spec.name!r} has no weights; remove path (got {spec.path!r})")
    for i, spec in enumerate(cfg.eval.audit):
        if spec.name not in REWARDS or spec.name == "http":
            known = ", ".join(sorted(n for n in REWARDS if n != "http"))
            fail(f"eval.audit.{i}.name", f"unknown or remote reward {spec.name!r}; audits run in-process: {known}")
        if spec.path is not None and not REWARDS[spec.name].weights:
            fail(f"eval.audit.{i}.path", f"reward {spec.name!r} has no weights; remove path (got {spec.path!r})")
    _validate_data(cfg, fail)
    if cfg.eval.features is not None:
        spec = cfg.eval.features
        with_features = sorted(n for n, r in REWARDS.items() if r.features)
        if spec.name not in with_features:
            fail("eval.features.name", f"{spec.name!r} has no image features; one of: {', '.join(with_features)}")
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
    if cfg.prompts.source == "file" and cfg.prompts.eval_path and not Path(cfg.prompts.eval_path).is_file():
        fail("prompts.eval_path", f"file {cfg.prompts.eval_path} does not exist")


def _check_token_keys(key: str, spec: RewardSpec) -> None:
    """At most one token source, only for name=http; a token_env is a variable's name; no token left redacted.

    Messages never quote the values: a token pasted into token_env by mistake is not echoed to the terminal.
    """
    given = [k for k in ("token", "token_env", "token_file") if getattr(spec, k) not in (None, REDACTED)]
    if given and spec.name != "http":
        raise ConfigError(f"{key}.{given[0]}: only a reward with name=http sends a token (this one is {spec.name!r})")
    if len(given) > 1:
        raise ConfigError(f"{key}.{given[1]}: give the token one way, not {' and '.join(given)}")
    if spec.token_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.token_env):
        raise ConfigError(
            f"{key}.token_env: must be the NAME of an environment variable (letters, digits, _) that holds the "
            "token, not the token itself"
        )
    if spec.token == REDACTED and not (spec.token_env or spec.token_file):
        raise ConfigError(
            f"{key}.token: this config was saved with its token redacted (rlalign never writes secrets); in the "
            "config file replace `token` with token_env: VAR (an environment variable holding it) or token_file: PATH"
        )


def _validate_data(cfg: RunCfg, fail: Any) -> None:
    """Offline preference training: an algorithm that trains on final-latent pairs, a sane online share."""
    from rlalign.algos import ALGORITHMS

    d = cfg.data
    if d.preferences is None:
        return
    if not ALGORITHMS[cfg.algo].offline_pairs:
        able = ", ".join(n for n, a in ALGORITHMS.items() if a.offline_pairs)
        fail("data.preferences", f"algo={cfg.algo} cannot train on offline pairs; one of: {able}")
    if cfg.algo.startswith("dde") and cfg.dde.state_source != "renoise":
        fail("dde.state_source", "offline pairs have no sampler trajectory: use renoise with data.preferences")
    if not (0.0 <= d.online_fraction < 1.0):
        fail("data.online_fraction", f"must be in [0, 1), got {d.online_fraction}")


def _check_actor_resources(key: str, num_cpus: float, num_gpus: float, resources: dict[str, float]) -> None:
    """Quantities Ray accepts: >= 0, finite, whole numbers above 1 GPU; CPU/GPU not among custom resources."""
    if not (math.isfinite(num_cpus) and num_cpus >= 0):
        raise ConfigError(f"{key}.num_cpus: must be >= 0, got {num_cpus}")
    if not (math.isfinite(num_gpus) and num_gpus >= 0):
        raise ConfigError(f"{key}.num_gpus: must be >= 0, got {num_gpus}")
    if num_gpus > 1 and num_gpus != int(num_gpus):
        raise ConfigError(f"{key}.num_gpus: a share above 1 GPU must be a whole number (Ray), got {num_gpus}")
    for name, value in resources.items():
        if name in ("CPU", "GPU"):
            raise ConfigError(f"{key}.resources.{name}: use {key}.num_{name.lower()}s instead")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}.resources.{name}: must be >= 0, got {value}")


def preflight(cfg: RunCfg) -> None:
    """Open and check, on the driver, every file a validated config names; raise ConfigError `<key>: <why>`.

    Run before Ray starts (the CLI calls it after `load_config`), so a bad file costs seconds, not a cluster start:
    prompt files (readable, at least one prompt), the model directory (layout; its scheduler must not clip),
    reward weights directories, `lora.init_from` (a complete .safetensors holding U-Net LoRA tensors of rank
    `lora.rank`) and the resume checkpoint (JSON state, LoRA file, optimizer.pt loadable with weights_only=True,
    so no pickle code runs). Only headers and small files are read; the U-Net itself loads in the actors.

    It also reads each http reward's token from its token_env / token_file into `spec.token` (`read_token`).
    """
    from rlalign.prompts import load_prompts

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    from rlalign.checkpoint import is_remote, resolve_out_dir

    try:
        resolve_out_dir(cfg.out_dir)  # a relative path under `ray job submit --working-dir` is refused
    except ValueError as err:
        fail("out_dir", str(err))
    if cfg.prompts.source == "file":
        for key, eval_split in (("prompts.path", False), ("prompts.eval_path", True)):
            if eval_split and not cfg.prompts.eval_path:
                continue
            try:
                load_prompts(cfg.prompts, eval_split=eval_split)
            except ValueError as err:
                fail(key, str(err))
    if cfg.model.path:
        from rlalign.models.loading import check_pipeline_dir, load_ddim_scheduler

        model_dir = Path(cfg.model.path).expanduser()
        try:
            check_pipeline_dir(model_dir, cfg.model.kind)
            load_ddim_scheduler(model_dir / "scheduler", cfg.sampler.num_steps)
        except (OSError, ValueError) as err:
            fail("model.path", str(err).splitlines()[0])
    _preflight_rewards(cfg)
    if cfg.data.preferences:
        from rlalign.offline.encode import check_preferences

        try:
            check_preferences(cfg.data)
        except (OSError, ValueError) as err:
            fail("data.preferences", str(err).splitlines()[0])
    for i, spec in enumerate(cfg.reward.models):
        spec.token = read_token(spec, f"reward.models.{i}")
    if cfg.lora.init_from:
        from rlalign.models.loading import check_lora_file

        try:
            check_lora_file(cfg.lora.init_from, cfg.lora.rank)
        except (OSError, ValueError) as err:
            fail("lora.init_from", str(err))
    if cfg.resume is not None and not is_remote(cfg.out_dir):  # a remote run is checked once fetched (driver)
        from rlalign.checkpoint import resolve_resume
        from rlalign.models.loading import check_checkpoint

        try:
            check_checkpoint(resolve_resume(cfg.run_dir, cfg.resume), cfg.lora.rank)
        except (OSError, ValueError) as err:
            fail("resume", str(err))


def _preflight_rewards(cfg: RunCfg) -> None:
    """Each reward's weights directory exists and is not empty; a reward that needs weights is given some."""
    from reward_servers.registry import REWARDS

    for i, spec in enumerate(cfg.reward.models):
        needs = REWARDS[spec.name].weights
        key = f"reward.models.{i}.path"
        if spec.path is not None:
            path = Path(spec.path).expanduser()
            state = "is empty" if path.is_dir() and not any(path.iterdir()) else None
            state = state if path.is_dir() else "does not exist"
            if state:
                raise ConfigError(f"{key}: weights directory {spec.path} {state}; reward {spec.name!r} needs {needs}")
        elif needs and not spec.options.get("tiny") and spec.name != "digit_prompt":
            # digit_prompt without a path uses the model directory's own classifier (the embedded digits model)
            raise ConfigError(f"{key}: reward {spec.name!r} loads its weights from a local directory holding {needs}")


def read_token(spec: RewardSpec, key: str) -> str | None:
    """The bearer token `spec` sends: from the environment variable `token_env`, the file `token_file`, or `token`.

    Where it is read: on the driver, by `preflight`, which stores it in `spec.token`; the reward actor gets it
    inside its RewardSpec (constructor arguments travel through Ray's own channels and are never printed), and the
    HTTP client is built there with it. So only the driver's node needs the variable or the file: under
    `ray job submit` or a KubeRay RayJob the driver is the job's entrypoint on the head node, so set the variable
    in the head node's environment (a Kubernetes secret as an env var, or the environment of `ray start --head`),
    or give token_file a path on the head node. The worker nodes never need it, and the token never has to be
    written into a runtime_env (which the Ray dashboard shows). Surrounding whitespace (a file's trailing newline)
    is dropped. Raises ConfigError `<key>.token_env|token_file: <why>` without quoting any token.
    """
    if spec.token_env:
        value = os.environ.get(spec.token_env)
        if value is None:
            raise ConfigError(
                f"{key}.token_env: environment variable {spec.token_env} is not set (it must be set where the "
                "driver runs: on a cluster, the head node)"
            )
        if not value.strip():
            raise ConfigError(f"{key}.token_env: environment variable {spec.token_env} is empty")
        return value.strip()
    if spec.token_file:
        path = Path(spec.token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}.token_file: {spec.token_file} does not exist (a file holding the token)")
        try:
            value = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}.token_file: cannot read {spec.token_file}: {type(err).__name__}") from err
        if not value.strip():
            raise ConfigError(f"{key}.token_file: {spec.token_file} is empty")
        if len(value.strip().splitlines()) > 1:
            raise ConfigError(f"{key}.token_file: {spec.token_file} must hold the token on one line")
        return value.strip()
    return spec.token


# what a saved or printed config holds in place of a plain `token` (validate refuses to send it)
REDACTED = "<redacted>"


def redacted(cfg: RunCfg) -> RunCfg:
    """A copy of `cfg` that is safe to print or save: every RewardSpec's token is hidden.

    A token read from token_env / token_file becomes None (the name or path stays, so a resumed run reads it
    again); a plain token becomes REDACTED, which `validate` refuses with a message saying to use token_env or
    token_file. Every writer goes through here: `to_yaml` (the printed config, run_dir/config.yaml, each
    checkpoint's config.yaml) and the wandb config (rlalign.driver._plain).
    """
    out = copy.deepcopy(cfg)
    for spec in _reward_specs(out):
        if spec.token_env or spec.token_file:
            spec.token = None
        elif spec.token is not None:
            spec.token = REDACTED
    return out


def _reward_specs(node: Any) -> Iterator[RewardSpec]:
    """Every RewardSpec inside a config (reward.models, eval.audit and any section added later)."""
    if isinstance(node, RewardSpec):
        yield node
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _reward_specs(getattr(node, f.name))
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _reward_specs(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from _reward_specs(item)


def to_yaml(cfg: RunCfg) -> str:
    """The config as YAML with its secrets redacted (`redacted`): what is printed and saved."""
    return OmegaConf.to_yaml(OmegaConf.structured(redacted(cfg)))


def save_config(cfg: RunCfg, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def summary(cfg: RunCfg) -> dict[str, int | float]:
    """Derived sizes and the resources the run asks Ray for, printed at start-up.

    cpus/gpus: sampler workers x their share + the learner + `replicas` actors per reward model (what `rlalign.actors`
    requests); a fractional GPU share (e.g. 0.5 per reward) counts as that fraction.
    """
    s, learner, rewards = cfg.sampler, cfg.learner, cfg.reward.models
    per_call = s.prompts_per_worker * s.images_per_prompt
    return {
        "images_per_sampler_call": per_call,
        "images_per_iteration": per_call * s.num_workers,
        "groups_per_iteration": s.prompts_per_worker * s.num_workers,
        "cpus": _count(
            s.num_workers * s.num_cpus
            + learner.num_workers * learner.num_cpus
            + sum(m.replicas * m.num_cpus for m in rewards)
        ),
        "gpus": _count(
            s.num_workers * s.num_gpus
            + learner.num_workers * learner.num_gpus
            + sum(m.replicas * m.num_gpus for m in rewards)
        ),
    }


def resources_line(cfg: RunCfg) -> str:
    """`asks Ray for 6 CPUs, 5.5 GPUs (GPUs: samplers 4 x 1 + learner 1 + rewards 0.5)`, from `summary`."""
    totals, s = summary(cfg), cfg.sampler
    reward_gpus = _count(sum(m.replicas * m.num_gpus for m in cfg.reward.models))
    n = cfg.learner.num_workers
    learner_gpus = f"{n} x {_count(cfg.learner.num_gpus)}" if n > 1 else _count(cfg.learner.num_gpus)
    return (
        f"asks Ray for {totals['cpus']} CPUs, {totals['gpus']} GPUs (GPUs: samplers {s.num_workers} x "
        f"{_count(s.num_gpus)} + learner {learner_gpus} + rewards {reward_gpus})"
    )


def _count(x: float) -> int | float:
    """Whole numbers print as ints (2, not 2.0); fractions keep up to 3 decimals."""
    return round(x) if abs(x - round(x)) < 1e-9 else round(x, 3)
