"""The loss: TF's label-smoothed cross-entropy, checked against numpy; finite in fp16."""
import numpy as np
import pytest
import torch

from trainer.config import LossConfig, MixupConfig, load_config
from trainer.loss import build_loss
from trainer.data.batch_augment import BatchAugment


def tf_smoothed_ce(logits: np.ndarray, targets: np.ndarray, eps: float) -> float:
    """TF: targets = onehot * (1 - eps) + eps / classes; loss = -sum(t * log_softmax), batch mean."""
    logits = logits.astype(np.float64)
    k = logits.shape[1]
    if targets.ndim == 1:
        targets = np.eye(k)[targets]
    t = targets * (1 - eps) + eps / k
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-(t * log_softmax).sum(axis=1).mean())


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_tf_formula(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)) * 3
    labels = rng.integers(0, 10, size=6)
    loss = build_loss(LossConfig(label_smoothing=eps))(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert loss.item() == pytest.approx(tf_smoothed_ce(logits, labels, eps), rel=1e-5)


def test_label_smoothed_loss_on_soft_targets_matches_tf_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 5))
    soft = rng.dirichlet(np.ones(5), size=4)  # what mixup hands the loss
    for impl in ("log_softmax", "log_of_softmax_unstable"):  # in fp32 both compute the same value
        loss = build_loss(LossConfig(label_smoothing=0.1, smoothing_impl=impl))(
            torch.tensor(logits, dtype=torch.float32), torch.tensor(soft, dtype=torch.float32))
        assert loss.item() == pytest.approx(tf_smoothed_ce(logits, soft, 0.1), rel=1e-5)


def test_label_smoothing_in_fp16_stays_finite_only_with_log_softmax():
    """PITFALLS: label smoothing computed as log(softmax(x)) in fp16 -- non-target probabilities
    underflow to 0, log gives -inf, the loss is inf (notes rows 5-6)."""
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0], [0.0, 20.0, 0.0, 0.0]], dtype=torch.float16)
    labels = torch.tensor([0, 1])
    stable = build_loss(LossConfig(label_smoothing=0.1, smoothing_impl="log_softmax"))(logits, labels)
    unstable = build_loss(LossConfig(label_smoothing=0.1, smoothing_impl="log_of_softmax_unstable"))(logits, labels)
    assert torch.isfinite(stable)
    assert stable.item() == pytest.approx(tf_smoothed_ce(logits.float().numpy(), labels.numpy(), 0.1), rel=1e-4)
    assert torch.isinf(unstable)


def test_label_smoothing_applies_with_mixup_on_and_off():
    """PITFALLS: a setting silently ignored -- label smoothing applied only when mixup was on."""
    cfg = load_config("demo")
    assert cfg.loss.label_smoothing == 0.1 and cfg.mixup.mode == "off"
    criterion = build_loss(cfg.loss)
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(4, 10)), dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, 4])
    images = torch.randn(4, 3, 8, 8)

    # mixup off: hard labels, smoothed by the loss
    off = criterion(logits, labels).item()
    assert off == pytest.approx(tf_smoothed_ce(logits.numpy(), labels.numpy(), 0.1), rel=1e-5)
    assert off != pytest.approx(tf_smoothed_ce(logits.numpy(), labels.numpy(), 0.0), rel=1e-3)

    # mixup on: the mixed targets are unsmoothed probabilities and the loss smooths them once
    for mode in ("tf", "batch"):
        mix = BatchAugment(None, MixupConfig(mode=mode, alpha=0.4), num_classes=10, seed=0, rank=0)
        _, soft = mix(images.clone(), labels, epoch=0, batch=0)
        assert soft.shape == (4, 10) and torch.allclose(soft.sum(1), torch.ones(4))
        assert soft.min() == 0  # unsmoothed: the classes in no mix keep weight 0
        on = criterion(logits, soft).item()
        assert on == pytest.approx(tf_smoothed_ce(logits.numpy(), soft.numpy(), 0.1), rel=1e-5)
