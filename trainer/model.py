"""The network: a timm EfficientNet with the recipe's init, BN and dropout settings,
and the two block variants of the notes (projection-BN gamma zero, activation after
the projection)."""
from __future__ import annotations

import copy
import math

import timm
import torch
import torch.nn as nn
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

from .config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """No pretrained weights: nothing is downloaded at run time."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                                  drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.name: {err}") from None
    init_weights(model, cfg.init)
    if cfg.head_init_classes and cfg.init != "torch":
        rescale_classifier_init(model, cfg.head_init_classes)
    set_batchnorm(model, tf_momentum=cfg.bn_momentum, eps=cfg.bn_eps)
    if cfg.zero_init_last_bn:
        zero_init_last_bn(model)
    if cfg.act_after_projection:
        add_act_after_projection(model)
    if cfg.sync_bn:
        # last, so it converts the BNs the steps above configured. It must come before the EMA copy
        # (its BN modules and state_dict must be the model's), the optimizer (it must hold the
        # parameters the converted model trains, or SyncBN's weights never update) and the engine (DeepSpeed broadcasts,
        # flattens and at ZeRO 1/2 re-points the parameters of the modules it is given)
        from .syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return model


def init_weights(model: nn.Module, how: str) -> None:
    if how == "timm":
        return  # timm's EfficientNets already use _init_weight_goog: TF's formulas below
    if how == "torch":
        for module in model.modules():  # PyTorch's defaults: kaiming-uniform(a=sqrt(5)), BN 1/0
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                module.reset_parameters()
        return
    if how != "tf":
        raise ConfigError(f"model.init: unknown {how!r}; valid: timm, tf, torch")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                # TF conv_kernel_initializer: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups
                # (a depthwise kernel is [k, k, in, 1] in TF: fan_out = k*k)
                fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Linear):
                # TF dense_kernel_initializer: uniform(-1/sqrt(out), 1/sqrt(out)); torch's weight is [out, in]
                bound = 1.0 / math.sqrt(module.out_features)
                module.weight.uniform_(-bound, bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()


def rescale_classifier_init(model: nn.Module, classes: int) -> None:
    """TF's dense init, uniform +-1/sqrt(classes), as if the classifier had `classes` outputs."""
    classifier = model.get_classifier()
    bound = 1.0 / math.sqrt(classes)
    with torch.no_grad():
        classifier.weight.uniform_(-bound, bound)
        if classifier.bias is not None:
            classifier.bias.zero_()


def set_batchnorm(model: nn.Module, tf_momentum: float, eps: float) -> None:
    # TF's momentum keeps that fraction of the running stat; torch's momentum is the
    # weight of the new batch, so 0.99 in TF is 0.01 in torch.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0 - tf_momentum
            module.eps = eps


def projection_bns(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, the BN after its 1x1 projection conv) for every MBConv / depthwise-separable block."""
    found = []
    for module in model.modules():
        if isinstance(module, InvertedResidual):
            found.append((module, module.bn3))
        elif isinstance(module, DepthwiseSeparableConv):  # B0's first stage: dw conv, SE, projection
            found.append((module, module.bn2))
    return found


def zero_init_last_bn(model: nn.Module) -> None:
    """Projection-BN gamma = 0 in residual blocks, so each starts as the identity. Blocks
    without a skip keep gamma 1: a zero there would zero everything after it."""
    with torch.no_grad():
        for block, bn in projection_bns(model):
            if block.has_skip:
                bn.weight.zero_()


def add_act_after_projection(model: nn.Module) -> None:
    """Notes row 34's bug: the block's activation applied after the projection BN, which
    TF (and timm) leave linear. timm's BatchNormAct2d holds an Identity there; swap in a
    copy of the block's own activation (from its first BN), not in-place."""
    for block, bn in projection_bns(model):
        if not isinstance(bn.act, nn.Identity):
            continue  # already has one (timm's pw_act)
        act = copy.deepcopy(block.bn1.act)
        if hasattr(act, "inplace"):
            act.inplace = False
        bn.act = act
