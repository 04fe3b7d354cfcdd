"""Secrets and cluster auth: reward tokens from token_env / token_file, redacted wherever a config is printed or
saved, resumable from a redacted config.yaml; `init_ray` turns Ray's token auth off only for the embedded Ray.

`ray.init` is replaced by a recorder (no cluster starts): what matters is the environment and arguments it sees.
One real check runs Ray's own auth decision (`maybe_enable_token_auth_if_token_available`) in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import reward_server_process

from rlalign.cli import main
from rlalign.config import (
    REDACTED,
    ConfigError,
    EvalCfg,
    RewardSpec,
    RunCfg,
    load_config,
    preflight,
    redacted,
    save_config,
    to_yaml,
)

SECRET = "tok-3f9a-very-secret"
URL = "http://127.0.0.1:9"  # nothing listens: configs load and print without a server


def http_config(tmp_path: Path, **token: str) -> Path:
    """A config file whose only reward is an http one with the given token keys."""
    spec = {"name": "http", "url": URL, **token}
    path = tmp_path / "http.yaml"
    path.write_text(json.dumps({"reward": {"models": [spec]}}))  # JSON is YAML
    return path


def test_token_env_and_token_file_are_read_on_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLALIGN_TEST_TOKEN", SECRET)
    cfg = load_config(http_config(tmp_path, token_env="RLALIGN_TEST_TOKEN"))
    assert cfg.reward.models[0].token is None  # loading reads no secret; preflight (on the driver) does
    preflight(cfg)
    assert cfg.reward.models[0].token == SECRET

    (tmp_path / "token").write_text(SECRET + "\n")  # the trailing newline of `echo tok > file` is dropped
    cfg = load_config(http_config(tmp_path, token_file=str(tmp_path / "token")))
    preflight(cfg)
    assert cfg.reward.models[0].token == SECRET


@pytest.mark.parametrize(
    "token, env, key",
    [
        ({"token_env": "RLALIGN_UNSET_TOKEN"}, {}, "reward.models.0.token_env: environment variable RLALIGN_UNSET"),
        ({"token_env": "RLALIGN_TEST_TOKEN"}, {"RLALIGN_TEST_TOKEN": " "}, "reward.models.0.token_env: "),
        ({"token_file": "/nonexistent/token"}, {}, "reward.models.0.token_file: /nonexistent/token does not exist"),
        ({"token_env": SECRET}, {}, "reward.models.0.token_env: must be the NAME of an environment variable"),
        ({"token": SECRET, "token_env": "X"}, {}, "reward.models.0.token_env: give the token one way"),
        ({"token": REDACTED}, {}, "reward.models.0.token: this config was saved with its token redacted"),
    ],
    ids=["env unset", "env empty", "file missing", "token pasted as env name", "two sources", "redacted token"],
)
def test_bad_token_keys_are_one_line_config_errors_exit_2(
    token: dict[str, str],
    env: dict[str, str],
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("RLALIGN_UNSET_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["config", str(http_config(tmp_path, **token)), "--check-files"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("config error: " + key) and out.count("\n") == 1
    assert SECRET not in out  # a token in the wrong key is never echoed


def test_token_on_a_reward_that_sends_none_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jpeg.yaml"
    path.write_text(json.dumps({"reward": {"models": [{"name": "jpeg", "token_env": "X"}]}}))
    with pytest.raises(ConfigError, match=r"^reward\.models\.0\.token_env: only a reward with name=http"):
        load_config(path)


def test_printed_and_saved_configs_hide_every_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # plain token: printed by `rlalign config` as the marker; token_env: the name only
    assert main(["config", str(http_config(tmp_path, token=SECRET)), "--check-files"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and f"token: {REDACTED}" in out
    monkeypatch.setenv("RLALIGN_TEST_TOKEN", SECRET)
    assert main(["config", str(http_config(tmp_path, token_env="RLALIGN_TEST_TOKEN")), "--check-files"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "token_env: RLALIGN_TEST_TOKEN" in out

    cfg = load_config(http_config(tmp_path, token_env="RLALIGN_TEST_TOKEN"))
    preflight(cfg)
    save_config(cfg, tmp_path / "run" / "config.yaml")  # run_dir/config.yaml; checkpoints save to_yaml(cfg) too
    assert SECRET not in (tmp_path / "run" / "config.yaml").read_text() and SECRET not in to_yaml(cfg)
    assert SECRET not in repr(cfg)  # a stray log of the dataclass shows no token either
    assert cfg.reward.models[0].token == SECRET  # redaction copies: the reward actor still gets the token


def test_wandb_config_is_redacted() -> None:
    from rlalign.driver import _plain  # the dict handed to wandb.init(config=...)

    cfg = load_config()
    cfg.reward.models.append(RewardSpec(name="http", url=URL, token=SECRET))
    plain = _plain(cfg)
    assert SECRET not in json.dumps(plain) and plain["reward"]["models"][-1]["token"] == REDACTED


def test_redaction_reaches_every_reward_spec() -> None:
    """Not just reward.models: any RewardSpec in the config (eval.audit here), however it got a token."""
    cfg = RunCfg(eval=EvalCfg(audit=[RewardSpec(name="http", token=SECRET), RewardSpec(name="http", token_env="V")]))
    cfg.eval.audit[1].token = SECRET  # as preflight leaves a token read from token_env
    out = redacted(cfg)
    assert [s.token for s in out.eval.audit] == [REDACTED, None] and out.eval.audit[1].token_env == "V"
    assert [s.token for s in cfg.eval.audit] == [SECRET, SECRET]


def test_resume_from_a_redacted_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """token_env: the saved config.yaml reads the variable again (a rotated token is picked up); a plain token:
    loading the saved config.yaml says what to do instead of sending the marker as a token."""
    monkeypatch.setenv("RLALIGN_TEST_TOKEN", SECRET)
    cfg = load_config(http_config(tmp_path, token_env="RLALIGN_TEST_TOKEN"))
    preflight(cfg)
    save_config(cfg, tmp_path / "env-run" / "config.yaml")
    monkeypatch.setenv("RLALIGN_TEST_TOKEN", "rotated")
    again = load_config(tmp_path / "env-run" / "config.yaml")
    preflight(again)
    assert again.reward.models[0].token == "rotated"

    plain = load_config(http_config(tmp_path, token=SECRET))
    save_config(plain, tmp_path / "plain-run" / "config.yaml")
    with pytest.raises(ConfigError, match=r"^reward\.models\.0\.token: .*redacted.*token_env: VAR"):
        load_config(tmp_path / "plain-run" / "config.yaml")


def test_token_from_env_authenticates_at_the_reward_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path: token_env -> preflight -> the reward actor's factory -> HTTPReward -> a server that
    answers 401 to a wrong token (so a token lost on the way fails here)."""
    from rlalign.actors import make_reward_model

    args = ["--model", "brightness", "--token", SECRET]
    with reward_server_process(args, tmp_path / "server.log") as (url, _proc):
        monkeypatch.setenv("RLALIGN_TEST_TOKEN", SECRET)
        cfg = load_config()
        cfg.reward.models = [RewardSpec(name="http", url=url, token_env="RLALIGN_TEST_TOKEN")]
        preflight(cfg)
        model = make_reward_model(cfg.reward.models[0], None)
        assert model.name == "brightness"  # /info needs the token


# ---------------------------------------------------------------------------------------------- init_ray and auth


@pytest.fixture
def recorded_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """ray.init replaced by a recorder of its kwargs and of RAY_AUTH_MODE at the moment it is called."""
    import ray

    calls: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> None:
        calls.append({**kwargs, "auth_mode_seen": os.environ.get("RAY_AUTH_MODE")})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    for name in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_embedded_ray_turns_auth_off(recorded_init: list[dict[str, Any]]) -> None:
    from rlalign.actors import init_ray

    assert init_ray(load_config(None, ["ray.num_cpus=2"]))
    (call,) = recorded_init
    assert call["auth_mode_seen"] == "disabled" and call["num_cpus"] == 2 and "address" not in call


def test_embedded_ray_keeps_an_auth_mode_the_user_set(
    recorded_init: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlalign.actors import init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    init_ray(load_config(None, ["ray.num_cpus=2"]))
    assert recorded_init[0]["auth_mode_seen"] == "token"


@pytest.mark.parametrize("how", ["ray.address", "RAY_ADDRESS"])
def test_joining_a_cluster_leaves_auth_alone(
    how: str, recorded_init: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlalign.actors import init_ray

    overrides = ["ray.address=10.0.0.1:6379"] if how == "ray.address" else []
    if how == "RAY_ADDRESS":  # what `ray job submit` sets for its entrypoint
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_ray(load_config(None, overrides))
    (call,) = recorded_init
    assert call["address"] == "10.0.0.1:6379" and "num_cpus" not in call  # joined, not a new local Ray
    assert call["auth_mode_seen"] is None and "RAY_AUTH_MODE" not in os.environ


def test_joined_job_runtime_env_merges_with_ours(
    recorded_init: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `ray job submit --runtime-env` Ray merges the job's runtime_env with ray.init's and refuses a variable
    set in both; init_ray leaves the job's own (its value wins)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from rlalign.actors import init_ray

    job_env = {"env_vars": {"HF_HUB_OFFLINE": "0", "OTHER": "1"}, "working_dir": "."}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    init_ray(load_config())
    ours = recorded_init[0]["runtime_env"]
    assert ours == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    merged = _merge_runtime_env(job_env, ours)
    assert merged is not None and merged["env_vars"]["HF_HUB_OFFLINE"] == "0"


AUTH_PROBE = """
import os, ray
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from rlalign.actors import init_ray
from rlalign.config import load_config

ray.is_initialized = lambda: False
# at ray.init time, Ray's own rule: does a process with this environment use the token in ~/.ray/auth_token?
ray.init = lambda **kw: print(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
init_ray(load_config())
os.environ.pop("RAY_AUTH_MODE")  # the embedded call set it (in this process only, as a real run would)
init_ray(load_config(None, ["ray.address=auto"]))
"""


def test_ray_itself_picks_up_the_token_when_joining(tmp_path: Path) -> None:
    """Real Ray code, no cluster: with ~/.ray/auth_token present (as `ray start --head` leaves it), a joining
    init_ray lets Ray use it; the embedded one turns it off. The old init_ray printed False twice."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", AUTH_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "True"]  # embedded: auth off; joining: Ray uses the cluster's token
