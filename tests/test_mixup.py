"""Mixup and cutmix on the normalized batch: TF's reference properties, timm's modes, and
random numbers that are a pure function of (seed, rank, epoch, micro batch)."""
import numpy as np
import pytest
import torch

from conftest import TINY, read_jsonl
from trainer.config import ConfigError, DataConfig, MixupConfig, load_config
from trainer.data.batch_augment import BatchAugment, build_batch_augment

N, K = 8, 10


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 6, 6, generator=g), torch.arange(N) % K  # distinct labels


def mix(mode, epoch=0, step=0, seed=0, rank=0, **kw):
    images, labels = batch()
    aug = BatchAugment(None, MixupConfig(mode=mode, **kw), num_classes=K, seed=seed, rank=rank)
    mixed, targets = aug(images.clone(), labels, epoch, step)
    return images.numpy(), labels.numpy(), mixed.numpy(), targets.numpy()


def test_tf_mixup_per_sample_lambda_reversed_partner_same_weights():
    images, labels, mixed, targets = mix("tf", alpha=0.2)
    onehot = np.eye(K)[labels]
    lams = []
    for i in range(N):
        j = N - 1 - i  # TF: the batch mixed with itself reversed, imgs[::-1]
        lam = targets[i, labels[i]]  # labels are distinct: the sample's own class weight is its lambda
        assert lam >= 0.5  # lambda = max(lambda, 1 - lambda)
        np.testing.assert_allclose(targets[i], lam * onehot[i] + (1 - lam) * onehot[j], atol=1e-6)
        np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-5)
        lams.append(lam)
    assert len(set(np.round(lams, 6))) > N // 2  # one lambda per sample, not one per batch


def test_tf_mixup_lambda_distribution_is_max_of_beta():
    """Over many batches, lambda follows max(B, 1 - B), B ~ Beta(alpha, alpha): mean checked by
    numpy sampling written independently."""
    lams = []
    for step in range(60):
        _, labels, _, targets = mix("tf", step=step, alpha=0.4)
        lams.append(targets[np.arange(N), labels])
    lams = np.concatenate(lams)
    ref = np.random.default_rng(0).beta(0.4, 0.4, size=200_000)
    assert lams.min() >= 0.5 and lams.max() <= 1.0
    assert lams.mean() == pytest.approx(np.maximum(ref, 1 - ref).mean(), abs=0.03)


def test_timm_batch_mode_uses_one_lambda():
    images, labels, mixed, targets = mix("batch", alpha=1.0)
    lam = targets[0, labels[0]]
    assert 0 < lam < 1
    for i in range(N):
        j = N - 1 - i  # timm's partner: the flipped batch
        assert targets[i, labels[i]] == pytest.approx(lam, abs=1e-6)
        np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-5)


def test_timm_pair_mode_one_lambda_per_pair():
    images, labels, mixed, targets = mix("pair", alpha=1.0)
    lams = [targets[i, labels[i]] for i in range(N)]
    for i in range(N // 2):
        assert lams[i] == pytest.approx(lams[N - 1 - i], abs=1e-6)  # the pair (i, n-1-i) shares it
    assert len(set(np.round(lams[: N // 2], 6))) > 1


def test_timm_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    images, labels, mixed, targets = mix("batch", alpha=0.0, cutmix_alpha=1.0)
    own = np.isclose(mixed, images).all(axis=1)  # (N, H, W): pixel kept from the sample itself
    partner = np.isclose(mixed, images[::-1]).all(axis=1)
    assert (own | partner).all() and partner.any()
    for i in range(N):
        assert targets[i, labels[i]] == pytest.approx(own[i].mean(), abs=1e-6)


def test_mixup_reproducible_for_same_seed_and_step_different_across_steps_ranks_epochs():
    for mode in ("tf", "batch", "pair"):
        first = mix(mode, epoch=1, step=5, alpha=0.4)[3]
        np.testing.assert_array_equal(first, mix(mode, epoch=1, step=5, alpha=0.4)[3])
        for other in (dict(epoch=1, step=6), dict(epoch=2, step=5), dict(epoch=1, step=5, rank=1),
                      dict(epoch=1, step=5, seed=1)):
            assert not np.allclose(first, mix(mode, alpha=0.4, **other)[3]), (mode, other)


def test_batch_augment_leaves_global_rngs_alone():
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    data = DataConfig(random_erasing=1.0)
    aug = build_batch_augment(data, MixupConfig(mode="batch", alpha=1.0), K, N, seed=0, rank=0)
    aug(*batch(), 0, 0)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_random_erasing_on_the_normalized_batch_per_sample_and_reproducible():
    images, labels = batch()
    data = DataConfig(random_erasing=0.5, erasing_mode="const")
    aug = build_batch_augment(data, MixupConfig(), K, N, seed=0, rank=0)
    erased = [aug(images.clone(), labels, 0, step)[0] for step in range(10)]
    zeroed = torch.stack([(e == 0).flatten(1).any(1) for e in erased])  # const mode fills with 0 (the mean)
    assert 0.2 < zeroed.float().mean() < 0.8  # each sample has its own 50% chance
    assert torch.equal(erased[3], aug(images.clone(), labels, 0, 3)[0])
    assert build_batch_augment(DataConfig(), MixupConfig(), K, N, seed=0, rank=0) is None


@pytest.mark.parametrize("overrides, message", [
    (["mixup.mode=tf", "mixup.cutmix_alpha=1.0"], "cutmix_alpha needs mode batch or pair"),
    (["mixup.mode=off", "mixup.cutmix_alpha=1.0"], "cutmix_alpha needs mode batch or pair"),
    (["mixup.mode=tf", "mixup.alpha=0"], "mode tf needs alpha > 0"),
    (["mixup.mode=batch", "mixup.alpha=0"], "needs alpha > 0 or cutmix_alpha > 0"),
    (["mixup.mode=shuffle"], "config key 'mixup.mode'"),
])
def test_impossible_mixup_settings_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("demo", overrides)
    assert "\n" not in str(err.value)


def test_timm_modes_need_an_even_micro_batch():
    with pytest.raises(ConfigError, match="must be even"):
        build_batch_augment(DataConfig(), MixupConfig(mode="pair"), K, 7, seed=0, rank=0)


@pytest.mark.slow  # test_reliability's exact-resume test covers the same numbers with mixup on
def test_a_resumed_run_redraws_the_same_augmentation_mixup_and_dropout(cli, tmp_path):
    """Stop after step 2 and resume: steps 3-4 give the uninterrupted run's losses exactly, with
    RandAugment, flip, random erasing and TF mixup on (and dropout, whose numbers the loader's
    iterator must not shift)."""
    args = ["train", "--recipe", "demo", *TINY, "train.max_steps=4", "train.log_every_steps=1",
            "checkpoint.every_epochs=1", "wandb.mode=disabled", "mixup.mode=tf", "data.hflip=0.5",
            "data.random_erasing=0.5", "data.auto_augment=rand-m9-mstd0.5"]
    for run in (["--run-dir", "whole"], ["--run-dir", "split", "--stop-at-step", "2"],
                ["--run-dir", "split", "--resume"]):
        result = cli(*args, *run)
        assert result.returncode == 0, result.stderr[-3000:]
    def losses(name):
        return [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert losses("split") == losses("whole") and len(losses("whole")) == 4
