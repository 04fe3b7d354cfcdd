"""One page a person reads in a browser: `rlalign report RUNS/NAME` writes RUNS/NAME/report.html.

The page is a single self-contained file: every plot and image grid is embedded as a base64 PNG data URI, the
CSS is inline, there is no JavaScript, and a Content-Security-Policy forbids the browser any network access. It
reads only the run directory (config.yaml, metrics.jsonl, placement.json, images/, ckpt/), so it can be written
again at any time, on any machine. Every section shows what the run logged and says so when a key is absent
(`audit/*` and `monitor/*` exist only when the run's evaluation logs them).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rlalign.metrics import read_metrics

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 16px 24px; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
       text-align: left; vertical-align: top; overflow-wrap: break-word; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.92em; }
pre { background: #f6f8fa; padding: 8px 12px; white-space: pre-wrap; overflow-wrap: break-word; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; overflow-wrap: break-word; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.pair img, .grid img { image-rendering: pixelated; }
.alarm { color: #b00020; font-weight: bold; } .muted { color: #666; }
.wide { overflow-x: auto; max-width: 100%; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 10px; }
.card { border: 1px solid #ddd; padding: 6px; } .card p { margin: 0 0 4px 0; font-size: 0.92em; }
.card .two { display: grid; grid-template-columns: 1fr 1fr; gap: 4px; } .card img { width: 100%; height: auto; }
.card span { font-size: 0.8em; color: #666; }
"""

# (title, which metric keys it draws, what it shows)
CURVES: list[tuple[str, Callable[[str], bool], str]] = [
    (
        "Trained reward: training samples vs plain samples",
        lambda k: (k.startswith("reward/") and k.endswith("/mean") and "group_std" not in k) or k.startswith("plain/"),
        "reward/: the images the learner trained on, rendered with the algorithm's sampling (TailorPO: best-of-k "
        "searches, high from the start); plain/: the policy's own plain samples, the curve that shows learning",
    ),
    (
        "Held-out evaluation (plain samples)",
        lambda k: k.startswith("eval/"),
        "the held-out prompts and seeds, plain DDIM sampling with the current LoRA",
    ),
    ("Audit rewards", lambda k: k.startswith("audit/"), "rewards scored on the held-out images but never trained on"),
    ("Loss", lambda k: k.startswith("loss/"), "learner loss per iteration"),
    (
        "Implicit accuracy",
        lambda k: "implicit_acc" in k or (k.startswith(("learner/", "loss/")) and k.endswith("accuracy")),
        "fraction of pairs where the policy prefers the winner more than the reference does",
    ),
    ("Policy lag", lambda k: k == "sampler/policy_lag", "learner version minus the version that rendered the batch"),
    (
        "Images per second",
        lambda k: k.startswith("throughput/") or k.endswith("images_per_s"),
        "throughput/: images per second of a whole iteration; sampler/: of rendering alone",
    ),
    ("Per-stage time", lambda k: k.startswith("time/"), "seconds per iteration spent in each stage"),
    (
        "Monitor",
        lambda k: k.startswith("monitor/") and k != "monitor/alarm",
        "drift from the base model and diversity, logged by the monitor (alarms: the Monitor table)",
    ),
]


def write_report(
    run_dir: str | os.PathLike[str], *, wall_s: float | None = None, alarms: Sequence[tuple[int, str]] = ()
) -> Path:
    """Write `run_dir/report.html` and return its path. `wall_s`: the run's wall time when the caller knows it
    (the driver does); otherwise it is estimated from the times config.yaml and metrics.jsonl were written.
    `alarms`: (iteration, sentence) of each monitor alarm, when the caller has them (the driver's RunResult)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() and not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} is not a run directory: it holds neither config.yaml nor metrics.jsonl")
    rows = read_metrics(run / "metrics.jsonl")
    if not alarms:  # the sentences the run wrote as they fired (rlalign/driver.py ALARMS_FILE)
        alarms = [(int(r["iteration"]), str(r["alarm"])) for r in read_metrics(run / "alarms.jsonl")]
    cfg, defaults = _configs(run)
    body = [
        _summary(run, cfg, rows, wall_s),
        _before_after_table(rows),
        _grids(run),
        _curves(rows),
        _monitor(rows, alarms),
        _checkpoints(run, cfg),
        _config_diff(cfg, defaults),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>rlalign report: {_e(run.name)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
    out = run / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------- sections
def _summary(run: Path, cfg: dict[str, Any], rows: list[dict[str, float]], wall_s: float | None) -> str:
    model = cfg.get("model", {})
    if model.get("path"):
        model_text = f"{model.get('kind', 'auto')}: {model['path']}"
    else:
        model_text = f"embedded digits model ({model.get('size', 'default')} size)"
    train_rows = _train_rows(rows)
    done = len({int(r["iteration"]) for r in train_rows})
    planned = cfg.get("iterations")
    if wall_s is None:
        wall_text = _estimated_wall(run)
    else:
        wall_text = _duration(wall_s)
    iter_s = [r["time/iteration_s"] for r in train_rows if "time/iteration_s" in r]
    items = [
        ("algorithm", str(cfg.get("algo", "?"))),
        ("model", model_text),
        ("Ray mode", str(cfg.get("ray", {}).get("mode", "?"))),
        ("iterations", f"{done}" + (f" of {planned} planned" if planned is not None else "")),
        ("wall time", wall_text),
        ("time in training iterations", _duration(sum(iter_s)) if iter_s else "not logged"),
        ("last iteration", _last_values(train_rows)),
        ("hardware", _hardware(run, cfg)),
        ("run directory", str(run.resolve())),
    ]
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<h1>rlalign run <code>{_e(run.name)}</code></h1>\n<h2>Summary</h2><table>{table}</table>"


def _before_after_table(rows: list[dict[str, float]]) -> str:
    evals = [r for r in rows if any(k.startswith(("eval/", "audit/")) for k in r)]
    if not evals:
        return "<h2>Before / after</h2><p class='muted'>no held-out evaluation was logged.</p>"
    first, last = evals[0], evals[-1]
    keys = sorted({k for r in (first, last) for k in r if k.startswith(("eval/", "audit/"))})
    out = []
    for k in keys:
        a, b = first.get(k), last.get(k)
        delta = f"{b - a:+.4g}" if a is not None and b is not None else ""
        out.append(
            f"<tr><td>{_e(k)}</td><td class='num'>{_num(a)}</td><td class='num'>{_num(b)}</td>"
            f"<td class='num'>{delta}</td></tr>"
        )
    head = (
        f"<tr><th>held-out metric</th><th>before (iteration {int(first['iteration'])})</th>"
        f"<th>after (iteration {int(last['iteration'])})</th><th>change</th></tr>"
    )
    return f"<h2>Before / after</h2><table>{head}{''.join(out)}</table>"


def _grids(run: Path) -> str:
    images = run / "images"
    before = sorted(images.glob("eval_before_iter_*.png"))
    after = sorted(images.glob("eval_after_iter_*.png"))
    mid = sorted(images.glob("eval_mid_iter_*.png"))
    if not before and not after:
        return "<h2>Held-out images</h2><p class='muted'>no evaluation image grids in images/.</p>"
    note = (
        "<p>The same held-out prompts and seeds rendered by the model before training (left) and after it "
        "(right): tile <i>i</i> on the left and tile <i>i</i> on the right share prompt and initial noise.</p>"
    )
    cards = _cards(before[0], after[-1]) if before and after else ""
    if cards:
        note = (
            "<p>The same held-out prompts and seeds rendered by the model before training (left of each pair) and "
            f"after it (right): both tiles of a pair share prompt and initial noise. Grids: {_e(before[0].name)}, "
            f"{_e(after[-1].name)}.</p>"
        )
        out = f"<h2>Held-out images, before and after</h2>{note}{cards}"
    else:  # grids written before the tiles' sidecar existed: the two grids side by side
        cells = []
        for label, paths in (("before", before[:1]), ("after", after[-1:])):
            if paths:
                cells.append(_figure(paths[0], f"{label}: {paths[0].name}"))
            else:
                cells.append(f"<p class='muted'>no {label} grid</p>")
        out = f"<h2>Held-out images, before and after</h2>{note}<div class='pair'>{''.join(cells)}</div>"
    if mid:
        figs = "".join(_figure(p, f"during training: {p.name}") for p in mid)
        out += f"<h3>During training</h3><div class='plots grid'>{figs}</div>"
    return out


def _cards(before: Path, after: Path) -> str:
    """One card per held-out image: its prompt as page text, then the before and after tiles cut out of the two
    grids (their boxes are in each grid's .json sidecar); "" when a sidecar is missing or the two disagree."""
    from PIL import Image

    sides = [_read_json(p.with_suffix(".json")) for p in (before, after)]
    if not all(s.get("boxes") for s in sides) or sides[0].get("captions") != sides[1].get("captions"):
        return ""
    with Image.open(before) as b_img, Image.open(after) as a_img:
        grids = [b_img.convert("RGB"), a_img.convert("RGB")]
    cards = []
    for i, caption in enumerate(sides[0]["captions"]):
        tiles = []
        for label, grid, side in zip(("before", "after"), grids, sides):
            buf = io.BytesIO()
            grid.crop(tuple(side["boxes"][i])).save(buf, format="PNG")
            tiles.append(f"<figure><img alt='{label}: {_e(caption)}' src='{_data_uri(buf.getvalue())}'>"
                         f"<span>{label}</span></figure>")  # fmt: skip
        cards.append(f"<div class='card'><p>{_e(caption)}</p><div class='two'>{''.join(tiles)}</div></div>")
    return f"<div class='cards'>{''.join(cards)}</div>"


def _curves(rows: list[dict[str, float]]) -> str:
    keys = sorted({k for r in rows for k in r if k != "iteration"})
    figs, missing = [], []
    for title, pick, what in CURVES:
        chosen = [k for k in keys if pick(k)]
        if not chosen:
            missing.append(title)
            continue
        png = _plot(rows, chosen, title)
        figs.append(
            f"<figure><img alt='{_e(title)}' src='{_data_uri(png)}'><figcaption><b>{_e(title)}</b>: "
            f"{_e(what)}. Keys: {_e(', '.join(chosen))}.</figcaption></figure>"
        )
    out = "<h2>Curves</h2>"
    if figs:
        out += f"<div class='plots'>{''.join(figs)}</div>"
    if missing:
        out += f"<p class='muted'>not logged in this run: {_e('; '.join(missing))}.</p>"
    return out


def _monitor(rows: list[dict[str, float]], alarms: Sequence[tuple[int, str]]) -> str:
    """One row per evaluation that logged monitor/* or audit/* values (the last row holds the latest), then the
    alarms: the sentences the run printed when the caller passes them, else the iterations monitor/alarm fired."""
    keys = sorted({k for r in rows for k in r if k.startswith(("monitor/", "audit/")) and k != "monitor/alarm"})
    evals = [r for r in rows if any(k.startswith(("monitor/", "audit/")) for k in r)]
    if not evals:
        return "<h2>Monitor</h2><p class='muted'>no monitor/* or audit/* metrics were logged in this run.</p>"
    has_alarm = any("monitor/alarm" in r for r in evals)
    head = "<tr><th>iteration</th>" + "".join(f"<th>{_breakable(k)}</th>" for k in keys)
    head += "<th>alarm</th></tr>" if has_alarm else "</tr>"
    body = []
    for r in evals:
        cells = "".join(f"<td class='num'>{_num(r.get(k))}</td>" for k in keys)
        alarm = ""
        if has_alarm:
            alarm = "<td class='alarm'>ALARM</td>" if r.get("monitor/alarm", 0) > 0 else "<td></td>"
        body.append(f"<tr><td class='num'>{int(r['iteration'])}</td>{cells}{alarm}</tr>")
    fired = [int(r["iteration"]) for r in evals if r.get("monitor/alarm", 0) > 0]
    if alarms:
        items = "".join(f"<li>iteration {it}: {_e(msg)}</li>" for it, msg in alarms)
        alarm_html = f"<p class='alarm'>{len(alarms)} alarm(s):</p><ul>{items}</ul>"
    elif fired:
        alarm_html = f"<p class='alarm'>monitor/alarm fired at iteration(s) {', '.join(map(str, fired))}.</p>"
    elif has_alarm:
        alarm_html = "<p>no alarm fired.</p>"
    else:
        alarm_html = "<p class='muted'>no alarm metric was logged.</p>"
    return f"<h2>Monitor</h2><div class='wide'><table>{head}{''.join(body)}</table></div>{alarm_html}"


def _checkpoints(run: Path, cfg: dict[str, Any]) -> str:
    root = run / "ckpt"
    ckpts = sorted(p for p in root.glob("iter_*") if p.is_dir()) if root.is_dir() else []
    if not ckpts:
        return "<h2>Checkpoints</h2><p class='muted'>no checkpoint was saved.</p>"
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else ckpts[-1].name
    items = []
    for p in ckpts:
        state = _read_json(p / "state.json")
        info = f"iteration {state['iteration']}" if "iteration" in state else ""
        if "weights_version" in state:
            info += f", weights v{state['weights_version']}"
        mark = " <b>(latest)</b>" if p.name == latest else ""
        lora = " diffusers_lora/" if (p / "diffusers_lora").is_dir() else ""
        items.append(f"<li><code>{_e(str(p.resolve()))}</code>{mark} {_e(info)}{_e(lora)}</li>")
    model = cfg.get("model", {})
    pipe_cls = "StableDiffusionXLPipeline" if model.get("kind") == "sdxl" else "StableDiffusionPipeline"
    model_dir = model.get("path") or _digits_dir(model)
    lora_dir = (root / latest / "diffusers_lora").resolve()
    code = (
        f"from diffusers import {pipe_cls}\n\n"
        f"pipe = {pipe_cls}.from_pretrained({json.dumps(str(model_dir))})\n"
        f"pipe.load_lora_weights({json.dumps(str(lora_dir))})\n"
    )
    return (
        f"<h2>Checkpoints</h2><ul>{''.join(items)}</ul>"
        f"<p>Load the latest LoRA in plain diffusers:</p><pre>{_e(code)}</pre>"
        f"<p>Continue the run: <code>rlalign train {_e(str((run / 'config.yaml').resolve()))} "
        f"out_dir={_e(str(run.resolve().parent))} name={_e(run.name)} resume=latest</code></p>"
    )


def _config_diff(cfg: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    if not cfg:
        return "<h2>Config</h2><p class='muted'>config.yaml is missing.</p>"
    if defaults is None:
        return f"<h2>Config</h2><pre>{_e(json.dumps(cfg, indent=1))}</pre>"
    run_flat, def_flat = _flatten(cfg), _flatten(defaults)
    changed = [k for k in sorted(set(run_flat) | set(def_flat)) if run_flat.get(k) != def_flat.get(k)]
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_show(def_flat.get(k)))}</td><td>{_e(_show(run_flat.get(k)))}</td></tr>"
        for k in changed
    )
    note = (
        "<p>Every key of the run's config.yaml that differs from the defaults for its model kind (the schema in "
        "rlalign/config.py, plus the digits preset for runs on the embedded model).</p>"
    )
    if not changed:
        return f"<h2>Config differences from the defaults</h2>{note}<p>none: the run used the defaults.</p>"
    head = "<tr><th>key</th><th>default</th><th>this run</th></tr>"
    return f"<h2>Config differences from the defaults</h2>{note}<table>{head}{rows}</table>"


# ---------------------------------------------------------------------- helpers
def _configs(run: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's resolved config and the defaults for its model kind, both as plain dicts."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return {}, None
    cfg = yaml.safe_load(path.read_text()) or {}
    try:
        from omegaconf import OmegaConf

        from rlalign.config import load_config

        model = cfg.get("model", {})
        overrides = [f"model.kind={model.get('kind', 'auto')}"]
        if model.get("path"):
            overrides.append(f"model.path={model['path']}")
        defaults = OmegaConf.to_container(OmegaConf.structured(load_config(None, overrides)))
    except Exception:  # an old or hand-edited config still gets a report, without the diff
        return cfg, None
    return cfg, defaults  # type: ignore[return-value]


def _train_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [r for r in rows if any(k.startswith(("loss/", "time/", "learner/")) for k in r)]


def _last_values(train_rows: list[dict[str, float]]) -> str:
    keys = ("reward/weighted/mean", "loss/total", "pref/implicit_acc", "sampler/policy_lag", "throughput/images_per_s")
    if not train_rows:
        return "no training iteration was logged"
    last = train_rows[-1]
    shown = ", ".join(f"{k} = {_num(last[k])}" for k in keys if k in last)
    return f"iteration {int(last['iteration'])}: {shown}"


def _hardware(run: Path, cfg: dict[str, Any]) -> str:
    parts = []
    placement = _read_json(run / "placement.json")
    devices = placement.pop("devices", {}) if isinstance(placement.get("devices"), dict) else {}
    nodes = sorted({str(n) for v in placement.values() if isinstance(v, list) for n in v})
    for role, where in placement.items():
        if isinstance(where, list):
            devs = devices.get(role, [])
            parts.append(
                f"{role}: {len(where)} on "
                + ", ".join(
                    f"node {nodes.index(str(n)) + 1} ({devs[i] if i < len(devs) else '?'})" for i, n in enumerate(where)
                )
            )
    if nodes:
        parts.append(f"{len(nodes)} Ray node(s): " + ", ".join(f"node {i + 1} = {n[:12]}" for i, n in enumerate(nodes)))
    ray_cfg, sampler, learner = cfg.get("ray", {}), cfg.get("sampler", {}), cfg.get("learner", {})
    if sampler:
        parts.append(
            f"asked: {sampler.get('num_workers', '?')} sampler(s) x {sampler.get('num_gpus', 0)} GPU, "
            f"learner {learner.get('num_gpus', 0)} GPU; Ray: {ray_cfg.get('address') or 'local'}"
        )
    return "; ".join(parts) or "not recorded"


def _estimated_wall(run: Path) -> str:
    start, end = run / "config.yaml", run / "metrics.jsonl"
    if not (start.is_file() and end.is_file()):
        return "not recorded"
    seconds = end.stat().st_mtime - start.stat().st_mtime
    return f"{_duration(seconds)} (config.yaml written to the last metrics row)"


def _digits_dir(model: dict[str, Any]) -> str:
    try:
        from rlalign.models.digits import cached_model_dir

        return str(cached_model_dir(model.get("cache_dir"), 0, model.get("size", "default")))
    except Exception:  # only a path shown in the page
        return "<the digits model directory>"


def _plot(rows: list[dict[str, float]], keys: Iterable[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _figure(path: Path, caption: str) -> str:
    img = f"<img alt='{_e(caption)}' src='{_data_uri(path.read_bytes())}'>"
    return f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min {s} s" if hours else f"{m} min {s} s"


def _breakable(key: str) -> str:
    """A metric key that may wrap after `/` and `_` (long monitor keys as column headers fit the page)."""
    return _e(key).replace("/", "/<wbr>").replace("_", "_<wbr>")


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)
