"""SyncBatchNorm: BatchNorm statistics over the global batch (all ranks), on GPUs and on the CPU.

timm's `convert_sync_batchnorm` does the conversion: it turns timm's BatchNormAct2d (BN + its
activation in one module, what every timm EfficientNet uses) into SyncBatchNormAct and keeps the
act; torch's own converter would turn it into a bare SyncBatchNorm and drop the activation.

torch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), and its kernels
(`batch_norm_stats`, ...) exist for CUDA only, in torch 2.14 as before. So the converted modules
get a forward that keeps torch's fused path on a GPU and, on the CPU (gloo), computes the same
statistics with differentiable all-reduces. That is what lets a CPU test show that N ranks x B
images train exactly like 1 rank x N*B.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from timm.layers.norm_act import SyncBatchNormAct as TimmSyncBatchNormAct
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward sums the gradients over the ranks too (torch's own,
    torch.distributed.nn.functional.all_reduce, is deprecated in 2.14 with no autograd successor)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def differentiable_all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    return _SumOverRanks.apply(tensor, group)


def _global_batch_norm(bn: nn.SyncBatchNorm, x: torch.Tensor, group) -> torch.Tensor:
    """Training-mode BN with mean and variance over every rank's batch, as torch's SyncBatchNorm.

    Two passes (mean, then the centred sum of squares) rather than E[x^2] - E[x]^2, which
    cancels badly in fp32. The all-reduces are autograd functions: their backward sums the
    gradients of the statistics over the ranks, as SyncBatchNorm's backward does."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, channels, *([1] * (x.dim() - 2)))
    sums = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // channels)])
    sums = differentiable_all_reduce(sums, group=group)
    count = sums[channels]
    mean = sums[:channels] / count
    centred = x - mean.view(shape)
    var = differentiable_all_reduce((centred * centred).sum(dims), group=group) / count  # biased, as BN uses
    out = centred * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.detach(), factor)
            bn.running_var.lerp_(var.detach() * (count / (count - 1)), factor)  # unbiased, as torch
    return out


def _forward(bn: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return nn.SyncBatchNorm.forward(bn, x)  # torch's fused CUDA kernels
    group = bn.process_group or (dist.group.WORLD if dist.is_initialized() else None)
    if not (bn.training and group is not None and dist.get_world_size(group) > 1):
        return _BatchNorm.forward(bn, x)  # eval, or one rank: plain BN (torch's would raise on the CPU)
    if not bn.track_running_stats and bn.running_mean is not None:
        raise ValueError("SyncBatchNorm on the CPU: track_running_stats=False with running stats is not supported")
    return _global_batch_norm(bn, x, group)


class SyncBatchNorm(nn.SyncBatchNorm):
    forward = _forward


class SyncBatchNormAct(TimmSyncBatchNormAct):
    """timm's BN + drop + activation, its BN synchronised on every device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _forward(self, x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


_CPU_CAPABLE = {nn.SyncBatchNorm: SyncBatchNorm, TimmSyncBatchNormAct: SyncBatchNormAct}


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm (timm's BatchNormAct2d included) -> its synchronised variant. The new
    modules share the old ones' parameters and buffers. Only the class of each converted module
    is then swapped for its CPU-capable subclass (state_dict keys and isinstance checks stay)."""
    model = timm_convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in _CPU_CAPABLE:
            module.__class__ = _CPU_CAPABLE[type(module)]
    return model
