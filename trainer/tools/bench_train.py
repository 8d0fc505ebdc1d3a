"""The trainer's own cost: a bare PyTorch loop against the trainer, eager and compiled, in one process.

    python -m trainer bench train                     # B0, 32 px, batch 64: the CPU table in reports/perf.md
    python -m trainer bench train --image-size 224 --batch 256 --precision bf16 --channels-last   # a GPU

Every row trains the same model (same init), with SGD (momentum 0.9), label-smoothed cross-entropy
and the same batch of synthetic uint8 images held in memory, normalized on the device each step.
The bare loop is what one writes by hand: forward, backward, step (autocast for fp16/bf16, with a
GradScaler for fp16; on a CPU that runs PyTorch's own slow half kernels, where the trainer accumulates
its fp16 convolutions in fp32 as a GPU does). The trainer rows are `fit` itself, on data.source=synthetic: DeepSpeed, the
EMA, the lr schedule, the health checks and the logging all run. Throughput is the median over
windows of `--window` steps after the first window (which holds the first step: compiling, allocator
warm-up); the first step's time is reported, and compile time = compiled first step - eager first step.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig, load_config
from ..data.loaders import normalize
from ..data.sources import synthetic_images
from ..model import build_model
from ..track import read_metrics, read_summary

LR, MOMENTUM, SMOOTHING = 0.05, 0.9, 0.1


def trainer_overrides(args, compile_setting: str) -> list[str]:
    return [f"model.name={args.model}", "model.drop_rate=0", "model.drop_path_rate=0",
            "data.source=synthetic", f"data.image_size={args.image_size}",
            f"data.synthetic_images={args.batch * 9}", "data.val_fraction=0.1111",
            # a GPU step outruns collating a 224 px batch in the training process; on a CPU workers steal its cores
            f"data.num_workers={2 if torch.cuda.is_available() else 0}",
            "optim.name=sgd", f"optim.lr={LR}", f"optim.lr_base_batch={args.batch}", f"optim.momentum={MOMENTUM}",
            "optim.weight_decay=0", "schedule.name=constant", "schedule.warmup_epochs=0",
            f"loss.label_smoothing={SMOOTHING}", "mixup.mode=off",
            f"train.micro_batch={args.batch}", f"train.max_steps={args.steps}", "train.epochs=1000",
            f"engine.precision={args.precision}", "engine.allow_cpu_fp16=true", f"compile.target={compile_setting}",
            f"compile.mode={args.compile_mode}", f"compile.channels_last={args.channels_last}",
            f"train.log_every_steps={args.window}", "train.eval_every_epochs=1000",
            "checkpoint.every_epochs=1000", "checkpoint.keep_best=none", "wandb.mode=offline"]


def steady_rate(window_rates: list[float]) -> float:
    """Median images/s over the windows after the first (the first holds the first step)."""
    if len(window_rates) < 2:
        raise ConfigError("bench train: --steps must give at least two windows of --window steps")
    return statistics.median(window_rates[1:])


def run_trainer(args, compile_setting: str, workdir: Path) -> dict:
    from ..loop import fit

    cfg = load_config("demo", trainer_overrides(args, compile_setting))
    run_dir = workdir / f"trainer-{compile_setting}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fit(cfg, run_dir, resume=None)
    summary = read_summary(run_dir)
    if summary["status"] != "completed":
        raise RuntimeError(f"bench train: the trainer run ended {summary['status']} ({run_dir})")
    rates = [row["images_per_s"] for row in read_metrics(run_dir) if "loss" in row]
    return {"images_per_s": steady_rate(rates), "first_step_s": summary["first_step_s"],
            "graphs": summary["compiled_graphs"], "recompiles": summary["recompiles"]}


def run_bare(args, device) -> dict:
    """The hand-written loop: the same model, optimizer, loss and images; nothing else."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, drop_rate=0, drop_path_rate=0), num_classes=1000).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    data = synthetic_images(args.batch * 8, args.image_size, seed=0)
    batches = [(data.images[i:i + args.batch], data.labels[i:i + args.batch]) for i in range(0, len(data), args.batch)]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    rates, started = [], time.time()
    window_started = started
    for step in range(1, args.steps + 1):
        images, labels = batches[step % len(batches)]
        inputs = normalize(images, device, channels_last=args.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(inputs), labels.to(device), label_smoothing=SMOOTHING)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % args.window == 0:  # the trainer reads its loss at the same steps
            loss.item()
            now = time.time()
            if step == 1:
                first_step_s = now - started
            else:
                rates.append(args.window * args.batch / (now - window_started))
                window_started = now
    return {"images_per_s": steady_rate(rates), "first_step_s": first_step_s, "graphs": None, "recompiles": None}


def bench_train(args) -> list[tuple[str, dict]]:
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        for mode in args.modes:
            if mode == "bare":
                rows.append(("bare PyTorch loop", run_bare(args, device)))
            else:
                setting = "off" if mode == "eager" else args.compile
                rows.append((f"trainer, {'eager' if mode == 'eager' else f'compile={setting}'}",
                             run_trainer(args, setting, Path(workdir))))
    return rows


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(rows: list[tuple[str, dict]], args) -> None:
    print(f"bench train: {args.model}, {args.image_size} px, batch {args.batch}, {args.precision}, "
          f"channels_last {args.channels_last}, {args.steps} steps, median of {args.window}-step windows "
          f"after the first; {device_name()}")
    base = {name.split(",")[0]: row["images_per_s"] for name, row in rows}
    eager = next((row["images_per_s"] for name, row in rows if name.endswith("eager")), None)
    eager_first = next((row["first_step_s"] for name, row in rows if name.endswith("eager")), None)
    print(f"{'':<28}{'images/s':>10}{'vs bare':>9}{'vs eager':>10}{'first step s':>14}{'graphs':>8}{'recompiles':>12}")
    for name, row in rows:
        rate = row["images_per_s"]
        vs_bare = f"{rate / base['bare PyTorch loop']:.3f}" if "bare PyTorch loop" in base else "-"
        vs_eager = f"{rate / eager:.3f}" if eager else "-"
        graphs = "-" if row["graphs"] is None else str(row["graphs"])
        recompiles = "-" if row["recompiles"] is None else str(row["recompiles"])
        print(f"{name:<28}{rate:>10.1f}{vs_bare:>9}{vs_eager:>10}{row['first_step_s']:>14.2f}{graphs:>8}{recompiles:>12}")
    compiled = [row for name, row in rows if "compile=" in name]
    if compiled and eager_first is not None:
        print(f"compile time (compiled first step - eager first step): {compiled[0]['first_step_s'] - eager_first:.1f} s")
