"""The launch files in deploy/: each parses, uses the field names Ray and KubeRay read, and runs a command that
rlalign accepts on a cluster that can hold it.

- cluster.yaml goes through Ray's own checks (`prepare_config` + `validate_config`: ray-schema.json and more, as
  `ray up` does); its GPU worker type at max_workers holds every actor of the submitted run.
- submit.sh is executed with `ray` replaced by a shell function that prints its arguments; the `rlalign train`
  after `--` is parsed by rlalign's CLI parser and loaded with `load_config`.
- runtime_env.yaml and the RayJob's runtimeEnvYAML build a `ray.runtime_env.RuntimeEnv` and merge with the one
  `init_ray` passes when joining (Ray refuses a variable set in both).
- rayjob.yaml: KubeRay field names, the image's Ray version, GPU limits that hold the run.
Paths that exist only on a cluster (the model directory) are replaced by a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from rlalign.cli import _split_config, build_parser
from rlalign.config import RunCfg, load_config
from rlalign.resources import missing_resources

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)($|_)", re.IGNORECASE)  # not TOKENIZERS_...

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def torch_pins() -> list[str]:
    """`TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1` from the Makefile: the pins every install uses."""
    match = re.search(r"^TORCH_PINS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile has no TORCH_PINS"
    return match.group(1).split()


def run_config(argv: list[str], model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> RunCfg:
    """`rlalign train ...` argv -> the RunCfg it trains with, through the CLI's own parser and load_config.

    The command runs in the repository (the job's working_dir, or the image's copy), so relative paths resolve
    from ROOT; model.path names a directory on the cluster's shared storage and is pointed at `model_dir`."""
    assert argv[:2] == ["rlalign", "train"], argv
    args = build_parser().parse_args(argv[1:])
    config, overrides = _split_config(args)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    monkeypatch.chdir(ROOT)
    return load_config(config, [*overrides, f"model.path={model_dir}"])


def check_joins_and_writes_outside_working_dir(cfg: RunCfg) -> None:
    assert cfg.ray.address, "the driver must join the cluster, not start a Ray of its own"
    # a relative out_dir lands in Ray's temporary copy of the working_dir (issue 11, item 4)
    assert Path(cfg.out_dir).is_absolute() or "://" in cfg.out_dir, cfg.out_dir


def init_ray_env_when_joining(job_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The runtime_env init_ray passes to ray.init inside a job submitted with `job_env` (ray.init recorded)."""
    from rlalign.actors import init_ray

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    init_ray(load_config())
    return seen[0]["runtime_env"]


def check_runtime_env(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid for Ray (RuntimeEnv validates every key it knows and refuses unknown ones with a warning-free
    error), string env vars, no secret, and it merges with what init_ray adds."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    known = set(RuntimeEnv.known_fields)
    assert set(env) <= known, f"not runtime_env keys: {set(env) - known}"
    monkeypatch.chdir(ROOT)  # working_dir "." is the repository
    RuntimeEnv(**env)
    assert not [k for k in env.get("env_vars", {}) if SECRET_NAME.search(k)], "secrets do not go in a runtime_env"
    merged = _merge_runtime_env(env, init_ray_env_when_joining(env, monkeypatch))
    assert merged is not None, "init_ray's env_vars collide with the job's"


# ------------------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_checks() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml("cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written, unknown keys refused
    validate_config(prepare_config(raw))  # after Ray fills its AWS defaults in, as `ray up` does


def test_cluster_yaml_has_a_cpu_head_and_autoscaled_gpu_workers() -> None:
    c = load_yaml("cluster.yaml")
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs the driver: CPU only"
    gpu = [t for name, t in types.items() if name != c["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= c["max_workers"] and t["max_workers"] >= 1


def test_cluster_yaml_installs_rlalign_with_the_pinned_torch_and_this_ray() -> None:
    c = load_yaml("cluster.yaml")
    setup = " ".join(c["setup_commands"])
    for pin in torch_pins():
        assert pin in setup, f"{pin} (Makefile TORCH_PINS) not installed by setup_commands"
    assert f"ray[default]=={ray.__version__}" in setup, "Ray on the cluster must match the submitting machine"
    mounted = [remote for remote, local in c["file_mounts"].items() if local == "."]
    assert mounted and any(f"cd {m} " in setup and "-e '.[rewards]'" in setup for m in mounted)
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in cmd for cmd in c["worker_start_ray_commands"])


# ---------------------------------------------------------------------------------- submit.sh + runtime_env.yaml


def submitted_args() -> list[str]:
    """Run deploy/submit.sh with `ray` as a shell function that prints its arguments, one per line."""
    script = 'ray() { printf "%s\\n" "$@"; }; export -f ray; bash deploy/submit.sh'
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DASHBOARD_ADDRESS", "RLALIGN_OUT_DIR"))}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_submit_sh_submits_a_valid_rlalign_run_the_cluster_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = submitted_args()
    assert args[:2] == ["job", "submit"] and "--address" in args
    assert args[args.index("--runtime-env") + 1] == "deploy/runtime_env.yaml"
    cfg = run_config(args[args.index("--") + 1 :], tmp_path, monkeypatch)
    check_joins_and_writes_outside_working_dir(cfg)
    assert cfg.ray.autoscaling, "cluster.yaml starts with no GPU node: the run must wait for the autoscaler"

    c = load_yaml("cluster.yaml")
    most: dict[str, float] = {}
    for type_name, t in c["available_node_types"].items():
        count = 1 if type_name == c["head_node_type"] else t["max_workers"]  # the head is always one node
        for name, value in t["resources"].items():
            most[name] = most.get(name, 0) + count * value
    assert missing_resources(cfg, most) == []


def test_runtime_env_yaml_is_a_valid_ray_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = load_yaml("runtime_env.yaml")
    check_runtime_env(env, monkeypatch)
    assert env["working_dir"] == "."


def test_runtime_env_pip_pins_torch_and_covers_rlaligns_dependencies() -> None:
    packages = load_yaml("runtime_env.yaml")["pip"]["packages"]
    assert set(torch_pins()) <= set(packages)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["rewards"]]

    def name(req: str) -> str:
        return re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")

    have = {name(p) for p in packages}
    missing = {name(r) for r in wanted} - have - {"ray"}  # Ray is the cluster's own
    assert not missing, f"runtime_env.yaml pip lacks {sorted(missing)} (pyproject.toml dependencies)"


# ---------------------------------------------------------------------------------------------------- rayjob.yaml


def test_rayjob_runs_a_valid_rlalign_command_on_a_cluster_that_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cd, _and, *argv = shlex.split(spec["entrypoint"])[1:]  # cd DIR && rlalign train ...
    assert _and == "&&"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"COPY --chown=ray:users . {cd}" in dockerfile, "the entrypoint must run in the image's repository copy"
    cfg = run_config(argv, tmp_path, monkeypatch)
    check_joins_and_writes_outside_working_dir(cfg)

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    for pin in torch_pins():
        assert pin in dockerfile
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    total = {"CPU": 0.0, "GPU": 0.0}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total["CPU"] += group["replicas"] * float(limits["cpu"])
        total["GPU"] += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
    assert total["GPU"] > 0, "no GPU worker group"
    assert missing_resources(cfg, total) == []


def test_rayjob_runtime_env_and_no_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    job = load_yaml("rayjob.yaml")
    check_runtime_env(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), monkeypatch)
    containers = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]
    for container in containers:
        for var in container.get("env", []):
            if SECRET_NAME.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]
