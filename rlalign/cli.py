"""`rlalign` command line: train, build the embedded base model, show a resolved config, write a run report.

Heavy imports (torch, ray, diffusers) happen inside the sub-commands, so `rlalign --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rlalign import __version__

EXAMPLES = """\
examples:
  rlalign train                                   the digits demo (configs/digits.yaml): tailorpo_g, local Ray
  rlalign train configs/diffusion_dpo_digits.yaml  a config file: only differences from the defaults
  rlalign config configs/tailorpo_sdxl.yaml model.path=/models/sdxl   check a GPU config and the GPUs it asks for
  rlalign train algo=ddpo iterations=5 sampler.num_workers=2
  rlalign train configs/tailorpo_sd15.yaml model.path=/models/sd15 --address auto   join a running Ray cluster
  rlalign config configs/tiny.yaml                print the resolved config and derived sizes
  rlalign base digits                             build (or show) the cached embedded digits model
  rlalign data digits-prefs prefs/ --pairs 200    preference pairs from the digits model (Pick-a-Pic layout)
  rlalign report runs/digits                      write runs/digits/report.html (one self-contained page)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlalign",
        description="Online reward alignment of text-to-image diffusion models (TailorPO, DDE, Diffusion-DPO, "
        "NCP, DDPO) on Ray, with swappable reward models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rlalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="run online alignment (embedded digits model when no config is given)",
        description="Run online alignment: samplers render, reward actors score, the learner updates a LoRA and "
        "broadcasts it. Writes runs/<name>/ (metrics.jsonl, TensorBoard, image grids, reward_curve.png, ckpt/).",
        epilog="overrides are key.sub=value pairs, e.g. learner.lr=1e-4 sampler.num_workers=2 resume=latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_args(train)
    train.add_argument("--address", help="join this Ray cluster (auto, ray://host:port) instead of starting one")
    train.add_argument(
        "--async",
        dest="async_mode",
        action="store_true",
        help="overlap sampling of iteration k+1 with learning on k (same as ray.mode=async)",
    )

    cfg = sub.add_parser(
        "config",
        help="print the resolved config (defaults <- file <- overrides)",
        description="Load, validate and print a config exactly as `train` would use it.",
    )
    _config_args(cfg)
    cfg.add_argument(
        "--check-files",
        action="store_true",
        help="also open the files the config names (prompts, model dir, reward weights, LoRA, checkpoint), as "
        "`train` does before Ray starts",
    )

    base = sub.add_parser(
        "base",
        help="build the embedded base model",
        description="Build the embedded digits text-to-image model (cached; built on first use by `train` too).",
    )
    base.add_argument("which", choices=["digits"], help="which embedded model")
    base.add_argument("--cache-dir", help="cache directory (default $RLALIGN_CACHE or ~/.cache/rlalign)")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--size", choices=["default", "tiny"], default="default", help="tiny builds in seconds")
    base.add_argument("--force", action="store_true", help="rebuild even if cached")

    data = sub.add_parser(
        "data",
        help="make offline preference data",
        description="Make offline preference data in the Pick-a-Pic v2 layout (rlalign/offline).",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    prefs = data_sub.add_parser(
        "digits-prefs",
        help="preference pairs from the embedded digits model, labelled by its digit classifier",
        description="Render k images per training prompt with the digits model, score them with its digit "
        "classifier and keep one pair per prompt group (the correct digit preferred). Writes OUT/train.parquet "
        "(caption, jpg_0, jpg_1, label_0, label_1), OUT/summary.json and OUT/README.md. Deterministic for a seed.",
    )
    prefs.add_argument("out", metavar="OUT", help="output directory")
    prefs.add_argument("--pairs", type=int, required=True, help="number of pairs to write")
    prefs.add_argument("--seed", type=int, default=0)
    prefs.add_argument("--model-dir", help="a built digits model directory (default: the cached embedded model)")
    prefs.add_argument("--images-per-prompt", type=int, default=8, help="images rendered per prompt group (k)")
    prefs.add_argument(
        "--min-gap", type=float, default=0.1, help="skip groups whose classifier-probability gap is smaller"
    )

    report = sub.add_parser(
        "report",
        help="write RUN_DIR/report.html, one self-contained page about a run",
        description="Write RUN_DIR/report.html: run summary, config differences from the defaults, curves, "
        "before/after image grids of the same prompts and seeds, monitor table and alarms, checkpoints and the "
        "lines that load the LoRA in diffusers. One file, images embedded, no network access. A run writes it "
        "at its end; this writes it again (e.g. for a run that stopped).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/digits")
    return parser


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML file with differences from the defaults (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`rlalign train a=b` puts a=b into `config`; move it to the overrides."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from rich.console import Console
    from rich.text import Text

    console = Console()
    try:
        if args.command == "base":
            return _base(args, console)
        if args.command == "report":
            return _report(args, console)
        if args.command == "data":
            return _data(args, console)
        from rlalign.config import ConfigError, load_config, preflight, resources_line, summary, to_yaml

        config, overrides = _split_config(args)
        if getattr(args, "address", None):
            overrides.append(f"ray.address={args.address}")
        if getattr(args, "async_mode", False):
            overrides.append("ray.mode=async")
        try:
            cfg = load_config(config, overrides)
            if args.command == "train" or args.check_files:
                preflight(cfg)  # every file the config names, opened before Ray starts
        except ConfigError as err:
            # one line, never wrapped, whatever the terminal width: `config error: <key>: <why>`
            console.print(Text.assemble(("config error:", "red"), f" {err}"), soft_wrap=True)
            return 2
        console.print(to_yaml(cfg), markup=False, highlight=False)
        if args.command == "config":
            console.print(summary(cfg))
            console.print(resources_line(cfg), markup=False, highlight=False)
            return 0
        return _train(cfg, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _train(cfg, console) -> int:
    from rlalign.actors import ActorFailure
    from rlalign.driver import summary_table, train
    from rlalign.models.loading import ModelDirError

    try:
        result = train(cfg, console)
    except (ActorFailure, ModelDirError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}")
        console.print(f"run files (config, metrics.jsonl, checkpoints saved so far) are kept under {cfg.out_dir}/")
        return 1
    console.print(summary_table(result))
    console.print(f"run directory : {result.run_dir}")
    console.print(f"metrics       : {result.run_dir / 'metrics.jsonl'} (TensorBoard: {result.run_dir / 'tensorboard'})")
    console.print(f"reward curve  : {result.run_dir / 'reward_curve.png'}")
    console.print(f"image grids   : {result.run_dir / 'images'}")
    console.print(f"checkpoint    : {result.last_checkpoint}  (resume with resume=latest name={result.run_dir.name})")
    console.print(f"wall time     : {result.seconds:.0f} s for {result.iterations_done} iterations")
    return 0


def _report(args: argparse.Namespace, console) -> int:
    from rlalign.report import write_report

    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        return 1
    console.print(f"report: {path}", markup=False, highlight=False)
    return 0


def _data(args: argparse.Namespace, console) -> int:
    from rlalign.offline.digits_prefs import make_digits_prefs

    try:
        summary = make_digits_prefs(
            args.out,
            args.pairs,
            model_dir=args.model_dir,
            seed=args.seed,
            images_per_prompt=args.images_per_prompt,
            min_gap=args.min_gap,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        return 1
    console.print(summary)
    console.print(f"preference pairs: {args.out}/train.parquet", markup=False, highlight=False)
    return 0


def _base(args: argparse.Namespace, console) -> int:
    import json
    import shutil

    from rlalign.models.digits import cached_model_dir, default_cache_dir, ensure_digits_model

    if args.force:
        shutil.rmtree(cached_model_dir(args.cache_dir, args.seed, args.size), ignore_errors=True)
    path = ensure_digits_model(args.cache_dir, seed=args.seed, progress=True, size=args.size)
    info = path / "build_info.json"
    console.print(f"digits model: {path}  (cache root {args.cache_dir or default_cache_dir()})")
    if info.is_file():
        console.print(json.loads(info.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
