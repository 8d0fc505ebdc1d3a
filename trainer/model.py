"""The network: a timm EfficientNet with the recipe's BN and dropout settings."""
from __future__ import annotations

import timm
import torch.nn as nn

from .config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """No pretrained weights: nothing is downloaded at run time."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                                  drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.name: {err}") from None
    set_batchnorm(model, tf_momentum=cfg.bn_momentum, eps=cfg.bn_eps)
    return model


def set_batchnorm(model: nn.Module, tf_momentum: float, eps: float) -> None:
    # TF's momentum keeps that fraction of the running stat; torch's momentum is the
    # weight of the new batch, so 0.99 in TF is 0.01 in torch.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0 - tf_momentum
            module.eps = eps
