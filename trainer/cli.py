"""Command line: `python -m trainer VERB ...` (also under `deepspeed --module trainer`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, available_recipes, load_config, read_recipe

OVERRIDES_HELP = """\
overrides are key=value pairs on the config tree, the value read as YAML (yes/no/on/off stay text):
  train.epochs=5  optim.lr=0.05  data.hflip=0  wandb.mode=disabled  model.name=efficientnet_b1
an unknown key, a wrong type or an out-of-range value stops the run (exit 2) before
anything is written."""


class Parser(argparse.ArgumentParser):
    """argparse, with a refused command line as one `error: ...` line (exit 2) like any other bad input,
    instead of the usage block and a line that starts with the program's name."""

    def error(self, message: str):
        verb = self.prog.removeprefix("python -m trainer").strip()
        print(f"error: {f'{verb}: ' if verb else ''}{message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: a count or a step number of 1 or more (0 or -3 steps were silently ignored)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m trainer",
        description="EfficientNet training through DeepSpeed, reproducing the TF recipe and its ablations.",
        epilog="verbs:\n  train     train a recipe (see `train --help`)\n"
               "  eval      top-1/top-5 of a run's checkpoint or a weights file on a validation set\n"
               "  recipes   list recipes and their variants\n"
               "  pack      pack an ImageFolder tree into one LMDB file\n"
               "  bench     bench data: input-pipeline images/s against torchvision's ImageFolder;\n"
               "            bench train: a bare PyTorch loop against the trainer, eager and compiled\n"
               "  sweep     one run per (variant, seed), here one after another, or --plan for a cluster\n"
               "  report    execute the notebooks on runs and render them as Markdown under reports/\n\n"
               f"recipes: {', '.join(available_recipes())}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher puts it first
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser(
        "train", help="train a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train RECIPE (YAML under trainer/recipes/), optionally one of its variants, with overrides.",
        epilog=f"recipes: {', '.join(available_recipes())}\n\n{OVERRIDES_HELP}\n\n"
               "examples:\n  python -m trainer train --recipe demo\n"
               "  python -m trainer train --recipe demo train.epochs=2 --run-dir runs/short\n"
               "  deepspeed --num_gpus 8 --module trainer train --recipe demo\n")
    train.add_argument("--recipe", default="demo", help="recipe name (default: demo)")
    train.add_argument("--variant", help="a named variant of the recipe (see `recipes`)")
    train.add_argument("--run-dir", type=Path, help="run directory (default: runs/<name>-<timestamp>/)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its latest checkpoint (it must have one); "
                            "the override resume=auto continues if there is one and starts fresh otherwise")
    train.add_argument("--change-batch", action="store_true",
                       help="with --resume (or resume=auto): continue with another world size, train.micro_batch or "
                            "accumulation; the schedule continues at the same number of images, the data where "
                            "its epoch was left (README: Interruption and resume)")
    train.add_argument("--stop-at-step", type=positive_int, metavar="N",
                       help="stop after optimizer step N as if interrupted (checkpoint, status interrupted)")
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    evaluate = verbs.add_parser(
        "eval", help="evaluate a run's checkpoint (model and EMA) or a weights file on a validation set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-1, top-5 and loss of a run's checkpoint (--run-dir, --checkpoint) or of a timm state "
                    "dict (--weights, with --recipe and overrides for the model and data), on data.val_path or "
                    "the run's own held-out split, with the recipe's eval transform. Writes the numbers as JSON "
                    "beside the run (eval-<tag>.json) or to --out. Runs under the deepspeed launcher too.",
        epilog="examples:\n  python -m trainer eval --run-dir runs/b0 --checkpoint best data.val_path=/data/imagenet/val\n"
               "  python -m trainer eval --weights runs/b0/ema.safetensors --recipe tf_efficientnet_b0 "
               "data.val_path=/data/imagenet/val\n")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a run directory: its config and checkpoints")
    source.add_argument("--weights", type=Path, help="a .safetensors or .pth state dict (timm's keys)")
    evaluate.add_argument("--checkpoint", default="latest", help="with --run-dir: latest (default), best, or a tag")
    evaluate.add_argument("--recipe", help="with --weights: the recipe whose model and eval transform to use")
    evaluate.add_argument("--out", type=Path, help="where to write the JSON (default: beside the run or weights)")
    evaluate.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.val_path=...)")

    verbs.add_parser("recipes", help="list recipes and their variants")

    sweep = verbs.add_parser(
        "sweep", help="one run per (variant, seed): here one after another, or --plan for a cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every (variant, seed) of RECIPE into SWEEP_DIR/<variant>-seed<N>/, one run at a "
                    "time, all in one W&B group with the variant as a tag. Runs already completed (or "
                    "collapsed) are skipped and interrupted ones continue, so the same command resumes "
                    "a stopped sweep.",
        epilog=f"{OVERRIDES_HELP}\n(the overrides apply to every run, after its variant)\n\n"
               "examples:\n  python -m trainer sweep --recipe notes_b0 --variants notes/1,notes/2 --seeds 2 "
               "data.source=digits data.image_size=32\n"
               "  python -m trainer sweep --recipe tf_efficientnet_b0 --seeds 3 --plan data.path=/data/train\n")
    source = sweep.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help="recipe name")
    source.add_argument("--proxy", help="a named proxy protocol (its recipe, variants, seeds and settings; "
                                        "reports/README.md): cifar10")
    sweep.add_argument("--variants", help="comma-separated variants (default: the recipe as it is); "
                                          "'all' for every variant, a trailing * for a prefix (notes/*)")
    sweep.add_argument("--seeds", type=positive_int, help="seeds 0..N-1 per variant (default 1, a proxy's own)")
    sweep.add_argument("--jobs", type=positive_int, default=1,
                       help="runs at a time on this machine, sharing its cores (default 1)")
    sweep.add_argument("--sweep-dir", type=Path, help="where the runs go (default runs/sweep-<recipe>, "
                                                      "runs/proxy-<name>)")
    sweep.add_argument("--group", help="W&B group (default: the sweep directory's name)")
    sweep.add_argument("--plan", action="store_true",
                       help="print deepspeed launcher lines and a SLURM array script instead of running")
    sweep.add_argument("--gpus", type=positive_int,
                       help="GPUs per run in --plan (default 8; 1 with --proxy, whose global batches are one process's)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")

    pack = verbs.add_parser("pack", help="pack an ImageFolder tree into one LMDB file (data.source=lmdb)",
                            description="Pack SRC (class folders of images) into the LMDB file DST: the encoded "
                                        "bytes as they are, labels, paths, class list; written to DST.tmp-* and "
                                        "renamed when complete.")
    pack.add_argument("src", type=Path, metavar="SRC")
    pack.add_argument("dst", type=Path, metavar="DST")
    pack.add_argument("--force", action="store_true", help="replace DST if it exists")

    report = verbs.add_parser(
        "report", help="execute the notebooks headless on runs and render them as Markdown",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Execute notebooks/ablations.ipynb on the sweeps (--sweep) and notebooks/loss_scale_collapse.ipynb "
                    "on two fp16 runs (--healthy, --collapsed) in a fresh kernel, and write them as Markdown with "
                    "their figures: OUT/ablations.md, OUT/loss_scale_collapse.md, OUT/<name>_files/*.png. "
                    "A missing input stops it before anything is written.",
        epilog="examples:\n  python -m trainer report --sweep runs/sweep-notes_b0\n"
               "  python -m trainer report --healthy runs/fp16 --collapsed runs/fp16-rmsprop --out reports/\n")
    report.add_argument("--sweep", nargs="+", type=Path, default=[], metavar="DIR",
                        help="sweep directories (with sweep.json); a variant in several at one precision: the last wins")
    report.add_argument("--baseline", metavar="VARIANT",
                        help="the row the deltas are against (default: notes row 1 if swept, else the first variant)")
    report.add_argument("--healthy", type=Path, metavar="RUN", help="an fp16 run that trained normally")
    report.add_argument("--collapsed", type=Path, metavar="RUN", help="an fp16 run whose loss scale collapsed")
    report.add_argument("--search", nargs="+", type=Path, default=[], metavar="RUN",
                        help="more fp16 runs, e.g. one setting at several learning rates: how far each got, "
                             "a section of the collapse report")
    report.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")

    bench = verbs.add_parser("bench", help="benchmarks (bench data, bench train)")
    bench_verbs = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    bench_data = bench_verbs.add_parser(
        "data", help="training-transform images/s per worker against torchvision's ImageFolder, same run")
    bench_data.add_argument("--source", required=True, help="an ImageFolder root or a packed LMDB file")
    bench_data.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    bench_data.add_argument("--images", type=positive_int, default=2000, help="images per pass (default 2000)")
    bench_data.add_argument("--image-size", type=positive_int, default=224, help="training crop size (default 224)")
    bench_data.add_argument("--batch-size", type=positive_int, default=32)
    bench_data.add_argument("--repeats", type=positive_int, default=2, help="passes per loader, best reported (default 2)")
    bench_data.add_argument("--auto-augment", metavar="POLICY",
                            help="timm AutoAugment/RandAugment policy after the crop, e.g. v0 (the TF recipe's)")
    bench_train = bench_verbs.add_parser(
        "train", help="a bare PyTorch loop against the trainer, eager and compiled, same run",
        description="images/s of a hand-written loop, of the trainer in eager mode and compiled, on the same "
                    "model, optimizer, batch and in-memory synthetic images (see trainer/tools/bench_train.py)")
    bench_train.add_argument("--model", default="efficientnet_b0")
    bench_train.add_argument("--image-size", type=positive_int, default=32)
    bench_train.add_argument("--batch", type=positive_int, default=64)
    bench_train.add_argument("--steps", type=positive_int, default=60, help="steps per row (default 60)")
    bench_train.add_argument("--window", type=positive_int, default=10, help="steps per timing window (default 10)")
    bench_train.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    bench_train.add_argument("--channels-last", action="store_true")
    bench_train.add_argument("--compile", choices=("model", "engine"), default="model",
                             help="the compiled row's compile.target (default model)")
    bench_train.add_argument("--compile-mode", default="default", help="compile.mode (default: default)")
    bench_train.add_argument("--modes", default="bare,eager,compiled",
                             help="rows to run, in order (default bare,eager,compiled)")
    return parser


def cmd_train(args) -> int:
    overrides = [o for o in args.overrides if o != "resume=auto"]
    resume = "required" if args.resume else ("auto" if len(overrides) < len(args.overrides) else None)
    if resume and args.run_dir is None:
        raise ConfigError("resuming needs --run-dir: the run directory to continue")
    if args.change_batch and not resume:
        raise ConfigError("--change-batch changes the batch of a run being continued: it needs --resume "
                          "(or the override resume=auto)")
    cfg = load_config(args.recipe, overrides, variant=args.variant)
    from .loop import fit  # heavy imports (torch, deepspeed) only once the config is valid

    summary = fit(cfg, args.run_dir, resume, stop_at_step=args.stop_at_step, change_batch=args.change_batch)
    return 0 if summary["status"] in ("completed", "interrupted") else 1


def cmd_eval(args) -> int:
    from .tools.evaluate_weights import evaluate_weights

    if args.weights is not None and args.recipe is None:
        raise ConfigError("--weights needs --recipe: the model and eval transform the weights are for")
    evaluate_weights(args.run_dir, args.checkpoint, args.weights, args.recipe, args.overrides, args.out)
    return 0


def cmd_recipes(args) -> int:
    for name in available_recipes():
        recipe = read_recipe(name)
        print(f"{name}: {recipe.get('description', '')}")
        for variant, body in (recipe.get("variants") or {}).items():
            meta = body.get("meta", {})
            rows = meta.get("rows", [meta["row"]] if "row" in meta else [])
            where = f"notes row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}" if rows else ""
            tag = ": ".join(part for part in (where, str(meta.get("reference", ""))) if part)
            print(f"  --variant {variant}: {meta.get('description', '')}" + (f" [{tag}]" if tag else ""))
    return 0


def cmd_sweep(args) -> int:
    from .tools.sweep import plan_proxy, plan_runs, print_plan, run_sweep, select_variants, write_manifest

    if args.proxy:
        sweep_dir = args.sweep_dir or Path("runs") / f"proxy-{args.proxy}"
        runs = plan_proxy(args.proxy, sweep_dir, args.seeds, args.overrides, args.variants, args.group)
        # the manifest lists the whole protocol, so that running some rows first (--variants) leaves the
        # report counting the others as not run yet instead of a table of only those rows
        listed = plan_proxy(args.proxy, sweep_dir, args.seeds, args.overrides, None, args.group) if args.variants else runs
    else:
        sweep_dir = args.sweep_dir or Path("runs") / f"sweep-{args.recipe}"
        runs = listed = plan_runs(args.recipe, select_variants(args.recipe, args.variants), args.seeds or 1,
                                  sweep_dir, args.overrides, args.group)
    if args.plan:
        # a proxy's batches and lrs are set for one process: under 8 ranks each global batch would be 8x
        print_plan(runs, args.gpus or (1 if args.proxy else 8), Path.cwd())
        return 0
    write_manifest(listed, sweep_dir, args.proxy)
    return run_sweep(runs, args.jobs)


def cmd_pack(args) -> int:
    import signal

    from .data.lmdb_source import pack

    # SIGTERM unwinds like Ctrl-C, so the partial DST.tmp-* is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    meta = pack(args.src, args.dst, force=args.force)
    print(f"packed {meta['count']} images of {len(meta['classes'])} classes into {args.dst}")
    return 0


def cmd_report(args) -> int:
    from .tools.report import NotebookFailed, report

    try:
        written = report(args.out, args.sweep, args.baseline, args.healthy, args.collapsed, args.search)
    except NotebookFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written:
        if path.suffix == ".md":
            print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    if args.bench == "train":
        from .tools.bench_train import bench_train, print_table as print_train_table

        args.modes = [m for m in args.modes.split(",") if m]
        if not args.modes or set(args.modes) - {"bare", "eager", "compiled"}:
            raise ConfigError(f"--modes: a comma-separated list of bare, eager, compiled (got {','.join(args.modes)})")
        if args.steps < 2 * args.window:  # checked before the first row runs, not after it
            raise ConfigError(f"bench train: --steps ({args.steps}) must give at least two windows of --window "
                              f"steps ({args.window})")
        rows = bench_train(args)
        print_train_table(rows, args)
        return 0
    from .tools.bench_data import bench_data, print_table

    rows = bench_data(args.source, workers=args.workers, images=args.images, image_size=args.image_size,
                      batch=args.batch_size, repeats=args.repeats, auto_augment=args.auto_augment)
    print_table(rows, args.source, args.workers, args.image_size, args.batch_size, args.auto_augment)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    # overrides may stand anywhere among the options: collect the leftovers as overrides
    args, extra = parser.parse_known_args(argv)
    if extra and (args.verb not in ("train", "sweep", "eval") or any(item.startswith("-") for item in extra)):
        Parser(prog=f"{parser.prog} {args.verb}").error(f"unrecognized arguments: {' '.join(extra)}")  # the verb's
    if extra:
        args.overrides += extra
    try:
        return {"train": cmd_train, "eval": cmd_eval, "recipes": cmd_recipes, "pack": cmd_pack, "bench": cmd_bench,
                "sweep": cmd_sweep, "report": cmd_report}[args.verb](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # a listing piped into `head`: stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
