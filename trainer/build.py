"""Building a run's parts from the config, each from its own section, in the order they need each other:

    data -> plan (the batch arithmetic) -> model -> EMA copy -> optimizer -> [compile] -> DeepSpeed engine

Everything that can refuse the config happens here, so a refused run has written nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import log
from .compiled import compile_engine, compile_model
from .config import Config, EngineConfig
from .data.batch_augment import build_batch_augment
from .data.loaders import Loaders, build_loaders
from .distributed import Distributed
from .ema import build_ema
from .engine import build_ds_config, build_engine, check_engine_supported
from .loss import build_loss
from .model import build_model
from .optim import LRSchedule, build_l2_penalty, build_optimizer, describe_decay, peak_lr
from .plan import RunPlan
from .step import StepParts


@dataclass(frozen=True)
class Parts:
    plan: RunPlan
    loaders: Loaders
    schedule: LRSchedule
    step: StepParts  # the engine, the EMA, the loss and the batch augmentation


def weights_can_be_nhwc(cfg: EngineConfig) -> bool:
    """With NHWC inputs, NCHW weights make every convolution convert its weight per call (B0 at
    32 px on one CPU core: 2.3x slower than NHWC weights). At fp32 and ZeRO 0 DeepSpeed keeps each
    parameter a tensor of its own, so after its setup (its broadcast takes contiguous tensors only)
    they can change layout. fp16/bf16 and ZeRO 1/2 alias the parameters into flat buffers that the
    optimizer updates: a new layout would silently detach the model from them, so they stay NCHW."""
    return cfg.precision == "fp32" and cfg.zero_stage == 0


def build_parts(cfg: Config, dist: Distributed) -> Parts:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    loaders = build_loaders(cfg.data, cfg.train.micro_batch, cfg.seed, dist.rank, dist.world_size)
    batch_augment = build_batch_augment(cfg.data, cfg.mixup, loaders.num_classes, cfg.train.micro_batch, cfg.seed,
                                        dist.rank)
    plan = RunPlan.build(cfg.train, cfg.checkpoint, cfg.schedule.warmup_epochs, dist.world_size,
                         loaders.train_size, len(loaders.train))
    ds_config = build_ds_config(cfg.engine, plan)
    check_engine_supported(cfg.engine)
    model = build_model(cfg.model, loaders.num_classes).to(dist.device())
    # create the EMA before DeepSpeed casts (fp16) or wraps the model: its own fp32 copy
    ema = build_ema(model, cfg.ema, dist.device())
    schedule = LRSchedule(cfg.schedule, peak_lr(cfg.optim, plan.global_batch), plan.schedule_epoch, plan.total_steps)
    optimizer = build_optimizer(cfg.optim, model, lr=schedule(0))
    log.info(describe_decay(cfg.optim, model))
    compile_model(model, cfg.compile)  # compile=model: in place, before DeepSpeed wraps it
    engine = build_engine(model, optimizer, ds_config, cfg.engine)
    if cfg.compile.channels_last and weights_can_be_nhwc(cfg.engine):
        for module in (engine.module, ema.module):
            module.to(memory_format=torch.channels_last)
    compile_engine(engine.ds, cfg.compile)
    step = StepParts(engine=engine, ema=ema, criterion=build_loss(cfg.loss),
                     l2_penalty=build_l2_penalty(cfg.optim, engine.module),  # the tensors DeepSpeed trains
                     batch_augment=batch_augment, channels_last=cfg.compile.channels_last)
    return Parts(plan, loaders, schedule, step)
