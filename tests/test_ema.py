"""EMA: a separate fp32 copy of the bare model, and evaluations that do not leak state."""
import torch

from trainer.config import load_config
from trainer.data.loaders import build_loaders
from trainer.ema import build_ema
from trainer.evaluate import evaluate
from trainer.model import build_model


def tiny_model_and_cfg(*overrides):
    cfg = load_config("demo", ["model.name=test_efficientnet", "data.image_size=16", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=10), cfg


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.train()
    model(torch.randn(8, 3, 16, 16))  # moves the BN running stats too


def test_ema_decay_zero_copies_the_model_weights_and_buffers():
    model, cfg = tiny_model_and_cfg("ema.decay=0", "ema.warmup=none")
    ema = build_ema(model, cfg.ema, "cpu")
    perturb(model)
    ema.update(model, step=100)
    for (name, a), b in zip(model.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(a.float(), b.float()), name


def test_ema_is_a_separate_fp32_copy():
    model, cfg = tiny_model_and_cfg()
    ema = build_ema(model, cfg.ema, "cpu")
    model_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    for name, tensor in ema.module.state_dict().items():
        assert tensor.data_ptr() not in model_ptrs, name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name


def test_evaluating_model_and_ema_in_either_order_gives_the_same_numbers():
    model, cfg = tiny_model_and_cfg("ema.decay=0.5")
    ema = build_ema(model, cfg.ema, "cpu")
    perturb(model)
    ema.update(model, step=100)
    perturb(model)  # model and EMA now differ, in weights and BN stats
    loaders = build_loaders(cfg.data, micro_batch=64, seed=0, rank=0, world_size=1)

    def run(order):
        results = {}
        for name in order:
            net = model if name == "model" else ema.module
            results[name] = evaluate(net, loaders.val, "cpu", torch.float32, name, show=False)
        return results

    first, second = run(["model", "ema"]), run(["ema", "model"])
    assert first == second
    assert first["model"] != first["ema"]
    assert model.training  # the model's mode is restored after evaluation


def test_tf_ema_decay_ramps_like_tf_num_updates():
    model, cfg = tiny_model_and_cfg("ema.warmup=tf", "ema.decay=0.9999")
    ema = build_ema(model, cfg.ema, "cpu")
    for n in (0, 1, 10, 100, 10_000, 10**6):
        assert ema.get_decay(n) == min(0.9999, (1 + n) / (10 + n))
