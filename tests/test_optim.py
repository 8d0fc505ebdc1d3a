"""Optimizers and weight decay against the formulas they claim, written out here in numpy."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import REPO, TINY, batch_plan
from trainer.config import ConfigError, EngineConfig, ModelConfig, OptimConfig, load_config
from trainer.engine import build_ds_config
from trainer.model import build_model
from trainer.optim import build_l2_penalty, build_optimizer, describe_decay, peak_lr, split_decay


def run_steps(optimizer, param, grads):
    """Feed the given gradients one optimizer step each; return the parameter after every step."""
    out = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float32)
        optimizer.step()
        out.append(param.detach().numpy().copy())
    return out


def single_tensor_model(values):
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=torch.float32))
    return model


# -- RMSProp

def test_rmsproptf_matches_tf_formulas():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(scale=s, size=(3, 4)).astype(np.float32) for s in (1e-3, 0.1, 1.0, 3.0, 0.01, 0.5)]
    lr, decay, momentum, eps = 0.016, 0.9, 0.9, 1e-3
    model = single_tensor_model(p0)
    cfg = OptimConfig(name="rmsproptf", lr=lr, momentum=momentum, alpha=decay, eps=eps, weight_decay=0)
    ours = run_steps(build_optimizer(cfg, model, lr), model.w, grads)

    # TF's ApplyRMSProp (training_ops): ms starts at 1, eps inside the sqrt, lr inside the momentum
    p, ms, mom = p0.astype(np.float64), np.ones_like(p0, dtype=np.float64), np.zeros_like(p0, dtype=np.float64)
    for g, got in zip(grads, ours):
        ms = decay * ms + (1 - decay) * g.astype(np.float64) ** 2
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        p = p - mom
        np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-6)


def test_torch_rmsprop_is_not_tf_first_step_is_huge():
    """torch starts the square average at 0 and puts eps outside the sqrt: with small
    gradients its first update is ~lr per weight, TF's is ~lr * g."""
    rng = np.random.default_rng(1)
    p0 = np.zeros(64, dtype=np.float32)  # from 0 the update is read without float32 cancellation
    g = rng.normal(scale=1e-3, size=(64,)).astype(np.float32)
    steps = {}
    for name in ("rmsproptf", "rmsprop"):
        model = single_tensor_model(p0)
        cfg = OptimConfig(name=name, lr=0.016, weight_decay=0)
        steps[name] = np.abs(run_steps(build_optimizer(cfg, model, 0.016), model.w, [g])[0] - p0)
    tf_first = 0.016 * np.abs(g) / np.sqrt(0.9 + 0.1 * g.astype(np.float64) ** 2 + 1e-3)
    np.testing.assert_allclose(steps["rmsproptf"], tf_first, rtol=1e-4, atol=1e-9)
    assert np.median(steps["rmsprop"] / steps["rmsproptf"]) > 100


def test_sgd_nesterov_is_explicit():
    rng = np.random.default_rng(2)
    p0, g = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    after = {}
    for nesterov in (False, True):
        model = single_tensor_model(p0)
        opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, nesterov=nesterov, weight_decay=0), model, 0.1)
        assert opt.param_groups[0]["nesterov"] is nesterov
        after[nesterov] = run_steps(opt, model.w, [g, g])[-1]
    # two steps of the same g: buf = g then 1.9 g; plain moves 2.9 g, Nesterov (g + 0.9 buf) 1.9 g + 2.71 g
    np.testing.assert_allclose(after[False], p0 - 0.1 * 2.9 * g, rtol=1e-5)
    np.testing.assert_allclose(after[True], p0 - 0.1 * (1.9 + 2.71) * g, rtol=1e-5)
    with pytest.raises(ConfigError, match="nesterov"):
        load_config("demo", ["optim.name=rmsproptf", "optim.nesterov=true"])


# -- which tensors decay

BN_NAME = re.compile(r"(^|\.)bn\d\.(weight|bias)$")  # timm's EfficientNet names its BN layers bn1, bn2, bn3


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="efficientnet_b0"), num_classes=1000)


EXAMPLES = {  # name -> decays? under each policy
    "no_bn": {"conv_stem.weight": True, "bn1.weight": False, "bn1.bias": False,
              "blocks.1.0.se.conv_reduce.bias": True, "blocks.1.0.se.conv_expand.weight": True,
              "blocks.1.0.bn3.weight": False, "conv_head.weight": True, "bn2.bias": False,
              "classifier.weight": True, "classifier.bias": True},
    "weights_only": {"conv_stem.weight": True, "bn1.weight": True, "bn1.bias": False,
                     "blocks.1.0.se.conv_reduce.bias": False, "blocks.1.0.bn3.weight": True,
                     "classifier.weight": True, "classifier.bias": False},
    "no_conv_bias": {"conv_stem.weight": True, "bn1.weight": True, "bn1.bias": True,
                     "blocks.1.0.se.conv_reduce.bias": False, "blocks.1.0.se.conv_expand.bias": False,
                     "classifier.weight": True, "classifier.bias": True},
    "all": {"conv_stem.weight": True, "bn1.bias": True, "blocks.1.0.se.conv_reduce.bias": True,
            "classifier.bias": True},
}


def tf_rule(name: str, policy: str) -> bool:
    """The four policies of the notes, from the names alone (independent of our module-type code)."""
    is_bn, is_bias = bool(BN_NAME.search(name)), name.endswith(".bias")
    is_conv_bias = is_bias and ".se.conv_" in name  # EfficientNet's only conv biases are the SE convs
    return {"all": True, "no_conv_bias": not is_conv_bias, "weights_only": not is_bias,
            "no_bn": not is_bn}[policy]


@pytest.mark.parametrize("policy", list(EXAMPLES))
def test_which_b0_params_receive_decay(b0, policy):
    decay, no_decay = split_decay(b0, policy)
    decayed = {n for n, _ in decay}
    names = [n for n, _ in b0.named_parameters()]
    assert len(decay) + len(no_decay) == len(names) and decayed | {n for n, _ in no_decay} == set(names)
    for name, expected in EXAMPLES[policy].items():
        assert (name in decayed) is expected, name
    assert decayed == {n for n in names if tf_rule(n, policy)}
    if policy == "weights_only":
        assert not any(n.endswith(".bias") for n in decayed)

    # the optimizer gets exactly these two groups, the decay one with the coupled weight_decay
    opt = build_optimizer(OptimConfig(weight_decay=1e-5, wd_params=policy), b0, 0.1)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd[1e-5] == {id(p) for _, p in decay}
    assert by_wd.get(0.0, set()) == {id(p) for _, p in no_decay}


def test_bn_found_by_module_type_not_name():
    """A BN layer whose name does not say "bn" (here `1`, `norm`) is still a BN layer."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8))
    model.norm = nn.BatchNorm1d(4)
    decayed = {n for n, _ in split_decay(model, "no_bn")[0]}
    assert decayed == {"0.weight", "0.bias"}


def test_decay_groups_are_described_in_one_line(b0):
    """The line a run logs (test_l2_loss_run_through_the_cli sees it in a run's output)."""
    cfg = OptimConfig(weight_decay=1e-5, wd_form="l2_loss", wd_params="no_bn")
    line = describe_decay(cfg, b0)
    n_bn = sum(1 for n, _ in b0.named_parameters() if BN_NAME.search(n))
    n_bn_params = sum(p.numel() for n, p in b0.named_parameters() if BN_NAME.search(n))
    assert "\n" not in line
    assert f"no decay {n_bn} tensors / {n_bn_params:,} params" in line and "l2_loss, no_bn" in line


# -- the weight-decay forms

def test_l2_loss_is_tf_l2_term(b0):
    wd = 1e-5
    penalty = build_l2_penalty(OptimConfig(weight_decay=wd, wd_form="l2_loss", wd_params="no_bn"), b0)
    expected = wd * sum(0.5 * np.sum(p.detach().double().numpy() ** 2)
                        for n, p in b0.named_parameters() if not BN_NAME.search(n))  # tf.nn.l2_loss = sum/2
    value = penalty()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)

    b0.zero_grad(set_to_none=True)
    value.backward()  # d/dw of wd * |w|^2 / 2 is wd * w; BN tensors get nothing
    assert torch.allclose(b0.conv_stem.weight.grad, wd * b0.conv_stem.weight)
    assert b0.bn1.weight.grad is None
    b0.zero_grad(set_to_none=True)
    assert build_l2_penalty(OptimConfig(weight_decay=wd, wd_form="coupled"), b0) is None


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)


@pytest.mark.parametrize("form", ["coupled", "decoupled", "decoupled_lr"])
def test_decay_forms_follow_their_formulas(form):
    torch.manual_seed(0)
    model = LinearBN()
    nn.init.normal_(model.bn.weight)
    nn.init.normal_(model.bn.bias)
    lr, wd = 0.1, 0.05
    start = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
    grads = {n: np.random.default_rng(i).normal(size=p.shape) for i, (n, p) in enumerate(model.named_parameters())}
    cfg = OptimConfig(name="sgd", momentum=0.9, lr=lr, weight_decay=wd, wd_form=form, wd_params="no_bn")
    opt = build_optimizer(cfg, model, lr)
    for n, p in model.named_parameters():
        p.grad = torch.tensor(grads[n], dtype=torch.float32)
    opt.step()
    for n, p in model.named_parameters():
        w, g = start[n], grads[n]
        decays = not n.startswith("bn.")
        # first SGD step with momentum: buf = g, p -= lr * buf
        if form == "coupled":  # L2 gradient inside the optimizer
            expected = w - lr * (g + (wd * w if decays else 0))
        elif form == "decoupled":  # p -= wd * p, no lr factor
            expected = w * (1 - (wd if decays else 0)) - lr * g
        else:  # p -= lr * wd * p
            expected = w * (1 - (lr * wd if decays else 0)) - lr * g
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=n)


def test_adamw_decoupled_lr_is_torch_adamw():
    torch.manual_seed(0)
    ours, ref = LinearBN(), LinearBN()
    ref.load_state_dict(ours.state_dict())
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, wd_form="decoupled_lr", wd_params="all")
    assert cfg.eps == 1e-8  # filled in from the name
    opt = build_optimizer(cfg, ours, 1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    for step in range(3):
        for model in (ours, ref):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (step + 1))
        opt.step()
        ref_opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


DS_SCRIPT = r"""
import json, sys
import deepspeed, torch, torch.nn as nn
from trainer.config import CheckpointConfig, EngineConfig, OptimConfig, TrainConfig
from trainer.distributed import init_distributed
from trainer.engine import build_ds_config
from trainer.optim import build_optimizer, set_lr
from trainer.plan import RunPlan

init_distributed()
out = {}
for stage in (0, 1):
    for form in ("decoupled", "decoupled_lr"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        nn.init.normal_(model[1].bias)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = OptimConfig(name="rmsproptf", lr=0.5, weight_decay=0.01, wd_form=form, wd_params="no_bn")
        optimizer = build_optimizer(cfg, model, lr=0.5)
        plan = RunPlan.build(TrainConfig(micro_batch=2), CheckpointConfig(), 0.0, 1, train_images=20,
                             micro_batches_per_epoch=10)
        ds = build_ds_config(EngineConfig(zero_stage=stage), plan)
        ds["zero_allow_untested_optimizer"] = True  # our optimizer classes are not on DeepSpeed's list
        engine = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)[0]
        set_lr(optimizer, 0.25)  # the trainer sets the lr on the client optimizer each step
        loss = (engine(torch.randn(2, 3, 8, 8)) * 0).sum()  # zero gradients: only the decay moves weights
        engine.backward(loss)
        engine.step()
        out[f"{stage}/{form}"] = {n: (p.detach() / before[n]).tolist() for n, p in engine.module.named_parameters()}
print("RESULT" + json.dumps(out))
"""


def test_decoupled_decay_through_deepspeed():
    """DeepSpeed calls step() on the client optimizer's param groups (at ZeRO 1 holding flat
    fp32 partitions, not the model's tensors): the decay must still land on the weights."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", DS_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    for key, ratios in out.items():
        factor = 1 - 0.01 * (0.25 if key.endswith("decoupled_lr") else 1.0)
        for name, ratio in ratios.items():
            expected = 1.0 if name.startswith("1.") else factor  # the BN tensors do not decay
            np.testing.assert_allclose(ratio, expected, rtol=1e-6, err_msg=f"{key} {name}")


# -- lr scaling

@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
def test_optimizer_lr_follows_global_batch(scaling):
    """world 2 x micro 32 x accum 4 = 256 images per step: the base lr, whatever the per-GPU batch."""
    cfg = OptimConfig(lr=0.016, lr_base_batch=256, lr_scaling=scaling)
    ds = build_ds_config(EngineConfig(), batch_plan(micro_batch=32, grad_accum=4, world_size=2))
    assert ds["train_batch_size"] == 256
    assert peak_lr(cfg, ds["train_batch_size"]) == pytest.approx(0.016)
    assert peak_lr(cfg, 32) != pytest.approx(0.016)  # the per-GPU batch would give base / 8 (or / sqrt 8)
    expected_4096 = 0.016 * (16 if scaling == "linear" else 4)
    assert peak_lr(cfg, 4096) == pytest.approx(expected_4096)
    assert peak_lr(OptimConfig(lr=0.016, lr_base_batch=128, lr_scaling=scaling), 256) == pytest.approx(
        0.016 * (2 if scaling == "linear" else np.sqrt(2)))


def test_l2_loss_run_through_the_cli(cli, tmp_path):
    """The TF form end to end: the penalty joins the loss in train_step, the log lists the groups."""
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, "train.max_steps=2",
                 "train.eval_every_epochs=10", "wandb.mode=disabled", "optim.wd_form=l2_loss",
                 "optim.wd_params=no_bn", "optim.weight_decay=1e-5", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weight decay 1e-05 (l2_loss, no_bn): decay " in result.stdout
