"""DeepSpeed around the model: process group, the DeepSpeed config derived from
the trainer's settings, the engine, and the EMA copy of the weights."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from .config import ConfigError, TrainConfig
from .precision import SkipNonFiniteStep, batchnorm_in_fp32, forget_initialize_step

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    # a gloo group over all ranks for small host-side agreements (the stop request): no device sync.
    # None means the default group, which is gloo already on the CPU
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> Distributed:
    """Join the launcher's process group (deepspeed/torchrun set RANK etc.), or make
    a group of one when started as plain `python -m trainer`.

    timeout_s bounds every collective (gloo and NCCL honour the group's timeout): when a rank
    dies or hangs, the others raise instead of waiting forever."""
    _quiet_import_notices()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
    world_size = int(os.environ["WORLD_SIZE"])
    # DeepSpeed (0.19) reduces gradients over its own clone of the world group, which it makes with
    # torch's default timeout (30 min), not the one above: a stuck rank held the others that long
    # whatever timeout_s said. Make the clone here, with ours; DeepSpeed then uses it.
    from deepspeed.utils import groups
    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world_size)), timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() == "cpu":
        _share_cores()
    cpu_group = None
    if world_size > 1 and dist.get_backend() != "gloo":
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)), cpu_group)


def _quiet_import_notices() -> None:
    """On a machine without a GPU, torch ("No CUDA runtime is found") and DeepSpeed ("Setting
    accelerator to CPU") warn while importing; the run's banner names the device instead, and
    stderr stays for what needs reading (a config error is then the only line)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from deepspeed.utils import logger as deepspeed_logger

    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.ERROR)
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator()  # detection happens, and warns, on the first call
    finally:
        deepspeed_logger.setLevel(level)


def _share_cores() -> None:
    """CPU ranks on one machine split its cores: each torch defaults to all of them, and N ranks x
    all cores oversubscribe (2 ranks x 2 threads on 2 cores ran 50x slower). OMP_NUM_THREADS, set by
    the user or by `deepspeed --bind_cores_to_rank`, wins."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // local_world))


def resolve_ds_config_path(name: str) -> Path:
    path = Path(name)
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.ds_config: DeepSpeed config {name} not found")


def _require(ds: dict, key: str, value, source: Path, setting: str) -> None:
    """The trainer owns batch, clipping, precision and ZeRO stage; a JSON that says
    otherwise is an error, so the file and the run can never disagree."""
    if ds.get(key, "auto") not in ("auto", value):
        raise ConfigError(f"{source}: {key}={ds[key]!r} contradicts the trainer's {setting}={value!r}; "
                          f"remove it from the file or change {setting}")


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    source = resolve_ds_config_path(cfg.ds_config)
    try:
        ds = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: not valid JSON ({err})") from None
    global_batch = world_size * cfg.micro_batch * cfg.grad_accum
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch, "train.micro_batch"),
        "gradient_accumulation_steps": (cfg.grad_accum, "train.grad_accum"),
        "train_batch_size": (global_batch, "world size x train.micro_batch x train.grad_accum"),
        "gradient_clipping": (cfg.grad_clip, "train.grad_clip"),
    }
    for key, (value, setting) in owned.items():
        _require(ds, key, value, source, setting)
        ds[key] = value
    zero = dict(ds.get("zero_optimization", {}))
    _require(zero, "stage", cfg.zero_stage, source, "train.zero_stage")
    ds["zero_optimization"] = {**zero, "stage": cfg.zero_stage}
    for section, precision in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = ds.get(section, {}).get("enabled", "auto")
        if enabled not in ("auto", cfg.precision == precision):
            raise ConfigError(f"{source}: {section}.enabled={enabled} contradicts train.precision={cfg.precision}")
        ds[section] = {**ds.get(section, {}), "enabled": cfg.precision == precision}
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer does its own logging
    if cfg.zero_stage > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # RMSProp-TF is not on DeepSpeed's list
    return ds


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, cfg: TrainConfig):
    """The DeepSpeed engine, and the non-finite guard where DeepSpeed has none (fp32, ZeRO 0)."""
    import deepspeed

    if cfg.precision in ("fp16", "bf16"):
        batchnorm_in_fp32(model)  # DeepSpeed casts BN weights to half; BN must still compute in fp32
    guard = SkipNonFiniteStep(optimizer) if cfg.precision == "fp32" and cfg.zero_stage == 0 else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=guard or optimizer, config=ds_config)
    forget_initialize_step(engine, optimizer)
    if engine.dp_world_size == 1 and cfg.zero_stage == 0:
        # one process: DeepSpeed would still flatten, all-reduce (with itself) and copy back every gradient
        engine.enable_backward_allreduce = False
    return engine, guard


class Ema(ModelEmaV3):
    """timm's ModelEmaV3 (weights and buffers), with the tensor pairs listed once: timm walks both
    state_dicts at every update, a cost on the order of a few percent of a small model's CPU step.
    The lists hold the tensors themselves (keep_vars), which DeepSpeed and loading update in place."""

    _pairs = None

    def apply_update_(self, model, decay: float):
        if self._pairs is None or self._pairs[0] is not model:
            both = list(zip(self.module.state_dict(keep_vars=True).values(),
                            model.state_dict(keep_vars=True).values()))
            floats = [(e, m) for e, m in both if e.is_floating_point()]
            self._pairs = (model, [e for e, _ in floats], [m for _, m in floats],
                           [(e, m) for e, m in both if not e.is_floating_point()])
        _, ema_floats, model_floats, others = self._pairs
        self._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
        for ema_v, model_v in others:  # BN's num_batches_tracked
            ema_v.copy_(model_v)


class TFDecayEma(Ema):
    """TF's ExponentialMovingAverage(decay, num_updates): the decay is min(decay, (1 + n) / (10 + n)),
    a ramp timm's warmup formula does not reproduce."""

    def get_decay(self, step=None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


def build_ema(model: nn.Module, cfg: TrainConfig, device) -> ModelEmaV3:
    """EMA on its own fp32 copy of the bare model, BN buffers included.

    Built before DeepSpeed wraps (and, in fp16, casts) the model, so it never shares
    tensors with the engine and never holds reduced-precision weights."""
    ema_class = TFDecayEma if cfg.ema_warmup == "tf" else Ema
    ema = ema_class(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup == "timm",
                     device=device, dtype=torch.float32, exclude_buffers=False)
    ema.module.requires_grad_(False)
    return ema
