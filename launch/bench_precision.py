"""fp16 vs bf16 through the trainer's DeepSpeed engine on one GPU: B0 at 224 on synthetic data.

    python launch/bench_precision.py                    # on a GPU: B0, 224 px, batch 256, 300 steps
    python launch/bench_precision.py --model test_efficientnet --size 32 --batch 8 --steps 6 --allow-cpu-fp16

Prints images/s after warm-up for each precision, and the fp16 loss-scale trace (the scale at
every step where it changed, and each skipped step). Synthetic data: random images made on the
device once, so the input pipeline is not measured.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_ds_config, build_engine, check_engine_supported
from trainer.model import build_model
from trainer.optim import build_optimizer, peak_lr
from trainer.plan import RunPlan


def run(name: str, args) -> dict:
    cfg = load_config("tf_efficientnet_b0", [f"model.name={args.model}", f"engine.precision={name}",
                                             f"train.micro_batch={args.batch}", "data.path=unused",
                                             f"engine.allow_cpu_fp16={args.allow_cpu_fp16}"])
    check_engine_supported(cfg.engine)
    plan = RunPlan.build(cfg.train, cfg.checkpoint, 0.0, world_size=1, train_images=args.batch * args.steps,
                         micro_batches_per_epoch=args.steps)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=1000)
    from deepspeed.accelerator import get_accelerator
    device = torch.device(get_accelerator().device_name(0))
    model.to(device)
    optimizer = build_optimizer(cfg.optim, model, lr=peak_lr(cfg.optim, plan.global_batch))
    engine = build_engine(model, optimizer, build_ds_config(cfg.engine, plan), cfg.engine)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).to(engine.input_dtype)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    trace, timed_from, started = [], args.steps // 3, None
    for step in range(args.steps):
        if step == timed_from:
            get_accelerator().synchronize()
            started = time.perf_counter()
        loss = F.cross_entropy(engine(images).float(), labels)
        engine.backward(loss)
        outcome = engine.step(step + 1)  # what the trainer's train step does, without data or EMA
        if not outcome.applied or (trace and trace[-1][1] != outcome.loss_scale) or not trace:
            trace.append((step, outcome.loss_scale, outcome.applied))
    get_accelerator().synchronize()
    seconds = time.perf_counter() - started
    return {"precision": name, "images_per_s": (args.steps - timed_from) * args.batch / seconds,
            "final_loss": loss.item(), "skipped_steps": engine.skipped_steps, "trace": trace}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--allow-cpu-fp16", action="store_true", help="smoke-test on a CPU")
    args = parser.parse_args()
    init_distributed()
    from deepspeed.accelerator import get_accelerator
    print(f"device: {get_accelerator().device_name()} "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''} | {args.model} {args.size}px "
          f"batch {args.batch}, {args.steps} steps (first third is warm-up)")
    for name in args.precisions.split(","):
        result = run(name, args)
        print(f"{name}: {result['images_per_s']:.0f} images/s, final loss {result['final_loss']:.3f}, "
              f"skipped steps {result['skipped_steps']}")
        if name == "fp16":
            print("  loss-scale trace (step, scale, applied): "
                  + " ".join(f"({s},{scale:g},{'ok' if ok else 'SKIP'})" for s, scale, ok in result["trace"]))


if __name__ == "__main__":
    main()
