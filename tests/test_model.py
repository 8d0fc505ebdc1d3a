"""The built network: size per model (paper), TF init, BN settings, the two block variants."""
import math

import pytest
import torch
import torch.nn as nn

from trainer.config import ModelConfig
from trainer.model import build_model

# paper (Tan & Le 2019, table 2), millions; and the exact trainable count, pinned so that a
# refactor that builds the wrong model (a B1 config building a B0) cannot pass
PAPER = {0: 5.3, 1: 7.8, 2: 9.2, 3: 12, 4: 19, 5: 30, 6: 43, 7: 66}
PINNED = {0: 5_288_548, 1: 7_794_184, 2: 9_109_994, 3: 12_233_232, 4: 19_341_616, 5: 30_389_784,
          6: 43_040_704, 7: 66_347_960}


@pytest.mark.parametrize("b", range(8))
def test_param_count_matches_paper(b):
    model = build_model(ModelConfig(name=f"tf_efficientnet_b{b}"), num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert count == PINNED[b]
    # within the paper's rounding (half a unit of its last digit); B2 is 9.11M trainable, which
    # the paper prints as 9.2M (9.18M counting BN moving statistics), so allow 1% as well
    half_unit = 0.05 if isinstance(PAPER[b], float) else 0.5
    assert abs(count / 1e6 - PAPER[b]) <= max(half_unit, 0.01 * PAPER[b])


def convs_by_name(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# stem 3x3x32; a depthwise 5x5 (fan_out = 25); an expansion 1x1; the 1x1 head to 1280
SAMPLED = ["conv_stem", "blocks.5.0.conv_dw", "blocks.5.1.conv_pw", "conv_head"]


@pytest.mark.parametrize("init", ["tf", "timm"])
def test_conv_init_std_is_tf(init):
    """TF: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups; dense uniform(+-1/sqrt(out)).
    timm's own EfficientNet init is the same formula (its _init_weight_goog)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="efficientnet_b0", init=init), num_classes=1000)
    convs = convs_by_name(model)
    for name in SAMPLED:
        conv = convs[name]
        k_h, k_w = conv.kernel_size
        fan_out = k_h * k_w * conv.out_channels / conv.groups
        w = conv.weight.detach().double()
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.04), name
        assert abs(w.mean().item()) < 0.1 * math.sqrt(2 / fan_out), name
    bound = 1 / math.sqrt(1000)
    fc = model.classifier.weight.detach()
    assert fc.abs().max().item() <= bound and fc.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.all(model.classifier.bias == 0)


@pytest.mark.parametrize("init", ["tf", "timm"])
def test_head_init_classes_gives_a_10_class_head_imagenets_logit_scale(init):
    """At 10 classes TF's dense init makes a fresh B0's first loss ~5.7 (ln 10 = 2.3); with the
    classifier initialised as for 1000 classes the first loss is near ln 10, as ImageNet's is near ln 1000."""
    def first_loss(**options):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="efficientnet_b0", init=init, drop_rate=0, drop_path_rate=0,
                                        **options), num_classes=10)  # train mode: BN on batch statistics
        images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return nn.functional.cross_entropy(model(images), torch.zeros(64, dtype=torch.long)).item()

    assert first_loss() > 4.0
    assert first_loss(head_init_classes=1000) == pytest.approx(math.log(10), abs=0.3)


def test_torch_init_is_different():
    """init=torch: PyTorch's defaults (kaiming-uniform, std = 1 / sqrt(3 fan_in)): the notes' pre-TF-init runs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="efficientnet_b0", init="torch"), num_classes=1000)
    conv = convs_by_name(model)["blocks.5.0.conv_dw"]  # depthwise 5x5: fan_in = fan_out = 25
    fan_in = conv.in_channels * math.prod(conv.kernel_size) // conv.groups
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.04)
    assert conv.weight.std().item() < 0.5 * math.sqrt(2 / 25)  # TF's std for this conv


@pytest.mark.parametrize("tf_momentum, eps", [(0.99, 1e-3), (0.9, 1e-5)])
def test_bn_eps_and_momentum(tf_momentum, eps):
    model = build_model(ModelConfig(name="tf_efficientnet_b0", bn_momentum=tf_momentum, bn_eps=eps), 1000)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 49  # stem, 16 blocks x 2-3, head
    for bn in bns:
        assert bn.momentum == pytest.approx(1 - tf_momentum)  # TF 0.99 keeps 99%: torch 0.01
        assert bn.eps == eps


def test_zero_init_last_bn_zeroes_projection_gammas():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="efficientnet_b0", zero_init_last_bn=True), num_classes=1000)
    residual = [b for b in model.blocks.modules() if hasattr(b, "bn3") and b.has_skip]
    plain = [b for b in model.blocks.modules() if hasattr(b, "bn3") and not b.has_skip]
    assert len(residual) == 9 and len(plain) == 6  # B0: 15 MBConv blocks, 9 with a skip
    for block in residual:
        assert torch.all(block.bn3.weight == 0) and torch.all(block.bn1.weight == 1)
    for block in plain:  # a zero without a skip would zero every block after it
        assert torch.all(block.bn3.weight == 1)
    assert torch.all(model.bn2.weight == 1)
    baseline = build_model(ModelConfig(name="efficientnet_b0"), num_classes=1000)
    assert all(torch.all(b.bn3.weight == 1) for b in baseline.blocks.modules() if hasattr(b, "bn3"))


def test_act_after_projection_adds_an_activation():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="test_efficientnet"), num_classes=10)
    torch.manual_seed(0)
    buggy = build_model(ModelConfig(name="test_efficientnet", act_after_projection=True), num_classes=10)
    for a, b in zip(plain.state_dict().values(), buggy.state_dict().values()):
        assert torch.equal(a, b)  # same weights: only the structure differs
    blocks = [b for b in buggy.modules() if hasattr(b, "bn3")]
    assert blocks
    for block in blocks:
        assert type(block.bn3.act) is type(block.bn1.act) and not isinstance(block.bn3.act, nn.Identity)
        assert not getattr(block.bn3.act, "inplace", False)
    assert all(isinstance(b.bn3.act, nn.Identity) for b in plain.modules() if hasattr(b, "bn3"))
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), buggy.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), buggy(x))


@pytest.mark.parametrize("options", [{}, {"init": "tf", "zero_init_last_bn": True, "act_after_projection": True}])
def test_small_model_forward_backward(options):
    model = build_model(ModelConfig(name="test_efficientnet", **options), num_classes=10)
    out = model(torch.randn(4, 3, 32, 32))
    out.logsumexp(1).mean().backward()
    assert out.shape == (4, 10) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters())
