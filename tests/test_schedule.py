"""The lr schedule against TF's formulas written out in numpy, and the settings the config refuses."""
import numpy as np
import pytest

from trainer.config import ConfigError, ScheduleConfig, load_config
from trainer.optim import LRSchedule

PEAK, SPE, RATE = 0.256, 10, 0.97  # steps per epoch 10: a stair every 2.4 epochs = 24 steps
TOTAL = 400


def schedule(**kw) -> LRSchedule:
    cfg = ScheduleConfig(**{"name": "tf_staircase", "warmup_epochs": 5, "decay_rate": RATE, "decay_epochs": 2.4,
                            **kw})
    return LRSchedule(cfg, PEAK, SPE, TOTAL)


def tf_lr(step):
    """efficientnet/utils.py build_learning_rate + train warmup, as TF computes it."""
    warmup_steps = int(SPE * 5)
    decay_steps = SPE * 2.4
    decayed = PEAK * RATE ** np.floor(step / decay_steps)  # tf.train.exponential_decay(staircase=True)
    return np.where(step < warmup_steps, PEAK * step / warmup_steps, decayed)


# 0, mid-warmup, last warmup step, end of warmup (2 stairs already, counted from step 0),
# then either side of the stairs at 7.2 and 9.6 epochs (steps 72 and 96: not whole epochs)
STEPS = [0, 1, 25, 49, 50, 71, 72, 73, 79, 80, 95, 96, 97, 240, 399]


def test_tf_staircase_with_linear_warmup_matches_tf():
    s = schedule()
    got = np.array([s(step) for step in STEPS])
    np.testing.assert_allclose(got, tf_lr(np.array(STEPS, dtype=np.float64)), rtol=1e-12)
    assert s(0) == 0.0 and s(50) == pytest.approx(PEAK * RATE ** 2)
    assert s(71) == pytest.approx(PEAK * RATE ** 2) and s(72) == pytest.approx(PEAK * RATE ** 3)


def test_tf_staircase_stairs_are_not_rounded_to_epochs():
    """The per-epoch variant (exp_epoch) moves the stair at 7.2 epochs to epoch 8; TF's stays at step 72."""
    tf, per_epoch = schedule(), schedule(name="exp_epoch")
    assert tf(72) == pytest.approx(PEAK * RATE ** 3)
    assert per_epoch(72) == pytest.approx(PEAK * RATE ** 2) and per_epoch(79) == pytest.approx(PEAK * RATE ** 2)
    assert per_epoch(80) == pytest.approx(PEAK * RATE ** 3)
    # numpy: a scheduler stepped once per epoch, floor(epoch / 2.4)
    for step in range(50, TOTAL):
        assert per_epoch(step) == pytest.approx(PEAK * RATE ** np.floor((step // SPE) / 2.4))


def test_decay_clock_from_end_of_warmup_shifts_the_stairs():
    s = schedule(warmup_in_decay_clock=False)
    for step in [50, 51, 73, 74, 97, 98, 399]:
        assert s(step) == pytest.approx(PEAK * RATE ** np.floor((step - 50) / 24.0)), step
    assert s(50) == pytest.approx(PEAK)  # the full peak right after warmup, unlike TF's RATE**2
    assert s(73) == pytest.approx(PEAK) and s(74) == pytest.approx(PEAK * RATE)


def test_warmup_forms_and_start():
    lin = schedule(warmup_start_lr=0.1)
    assert lin(0) == pytest.approx(0.1 * PEAK) and lin(25) == pytest.approx(PEAK * (0.1 + 0.9 * 0.5))
    exp = schedule(warmup_form="exponential", warmup_start_lr=0.01)
    for step in (0, 10, 25, 49):  # geometric: start^(1-t) * peak^t
        t = step / 50
        assert exp(step) == pytest.approx((0.01 * PEAK) ** (1 - t) * PEAK ** t)
    assert exp(25) == pytest.approx(0.1 * PEAK)


@pytest.mark.parametrize("in_clock", [True, False])
def test_cosine_reaches_floor(in_clock):
    s = LRSchedule(ScheduleConfig(name="cosine", warmup_epochs=5, min_lr=0.01, warmup_in_decay_clock=in_clock),
                   PEAK, SPE, TOTAL)
    lrs = np.array([s(step) for step in range(TOTAL)])
    assert lrs[-1] == pytest.approx(0.01 * PEAK, rel=1e-9)  # the last step taken is TOTAL - 1
    assert lrs[50:].min() == pytest.approx(0.01 * PEAK, rel=1e-9)  # never below it after warmup
    assert np.all(np.diff(lrs[50:]) < 0)  # strictly falling all the way: not flat, not past the floor
    if not in_clock:
        assert lrs[50] == pytest.approx(PEAK)
    # numpy reference
    start = 0 if in_clock else 50
    progress = (np.arange(50, TOTAL) - start) / (TOTAL - 1 - start)
    np.testing.assert_allclose(lrs[50:], 0.01 * PEAK + (PEAK - 0.01 * PEAK) * 0.5 * (1 + np.cos(np.pi * progress)))


def test_constant_after_warmup():
    s = LRSchedule(ScheduleConfig(name="constant", warmup_epochs=1), PEAK, SPE, TOTAL)
    assert s(5) == pytest.approx(PEAK / 2) and all(s(step) == PEAK for step in range(10, TOTAL))


def test_exponential_warmup_from_zero_is_rejected():
    with pytest.raises(ConfigError, match="exponential warmup from 0") as err:
        load_config("demo", ["schedule.warmup_form=exponential", "schedule.warmup_start_lr=0",
                             "schedule.warmup_epochs=5"])
    assert "\n" not in str(err.value) and "schedule.warmup_start_lr" in str(err.value)
    # the default start (0) is checked too, not only an explicit one
    with pytest.raises(ConfigError, match="exponential warmup from 0"):
        load_config("demo", ["schedule.warmup_form=exponential", "schedule.warmup_epochs=5"])
    load_config("demo", ["schedule.warmup_form=exponential", "schedule.warmup_start_lr=1e-3"])


@pytest.mark.parametrize("override, key", [
    ("schedule.decay_rate=0", "schedule.decay_rate"),
    ("schedule.decay_rate=1.5", "schedule.decay_rate"),
    ("schedule.decay_rate=-0.5", "schedule.decay_rate"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("schedule.name=step", "schedule.name"),
])
def test_impossible_settings_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config("demo", [override])
    assert "\n" not in str(err.value)
