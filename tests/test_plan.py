"""The run's arithmetic in one place (trainer/plan.py): the global batch, accumulation derived from it,
sizes that must divide, TF's steps per epoch, the cadence; what a run prints and saves of it; and
configs written in the old layout (everything under `train`) still load and resume."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml

from conftest import TINY
from trainer.checkpoint import check_zero_world_size
from trainer.config import LEGACY_KEYS, CheckpointConfig, ConfigError, TrainConfig, load_config, move_legacy_keys
from trainer.plan import RunPlan, check_same_batch, rebatch
from trainer.state import TrainState


def plan(world_size=1, images=1_281_167, **train):
    cfg = TrainConfig(**train)
    per_rank = images // world_size // cfg.micro_batch
    return RunPlan.build(cfg, CheckpointConfig(every_epochs=0.5), 5.0, world_size, images, per_rank)


def test_global_batch_is_world_times_micro_batch_times_accumulation():
    p = plan(world_size=8, micro_batch=128, grad_accum=2, epochs=350)
    assert p.global_batch == 2048 and p.grad_accum == 2
    assert p.steps_per_epoch == 1_281_167 // 8 // 128 // 2  # what the loader hands out, whole steps
    assert p.tf_steps_per_epoch == pytest.approx(625.5698, abs=1e-4)  # TF: images / batch, a fraction
    assert p.checkpoint_every == round(0.5 * p.tf_steps_per_epoch) and p.log_every == 10


def test_the_schedule_clock_counts_epochs_as_tf_does():
    """TF: steps_per_epoch = train images / global batch, a fraction, whatever the loader drops; warmup
    and total steps are its multiples, truncated and rounded up."""
    p = RunPlan.build(TrainConfig(micro_batch=256, epochs=350), CheckpointConfig(), 5.0, 8, 1_281_167,
                      1_281_167 // 8 // 256)
    assert p.steps_per_epoch == 625 and p.schedule_epoch == pytest.approx(625.5698, abs=1e-4)
    assert p.warmup_steps == 3127 and p.total_steps == 218_949


def test_accumulation_is_derived_from_a_stated_global_batch():
    p = plan(world_size=8, micro_batch=64, global_batch=2048)
    assert p.grad_accum == 4 and p.global_batch == 2048


@pytest.mark.parametrize("train, message", [
    ({"micro_batch": 96, "global_batch": 2048}, "not a multiple of world size 8 x train.micro_batch 96"),
    ({"micro_batch": 64, "global_batch": 2048, "grad_accum": 2}, "not both"),
])
def test_a_global_batch_that_does_not_divide_is_refused(train, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        plan(world_size=8, **train)


def test_fewer_images_than_one_global_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        RunPlan.build(TrainConfig(micro_batch=64), CheckpointConfig(), 0, 1, train_images=40, micro_batches_per_epoch=0)


def test_a_checkpoint_resumes_only_with_its_own_batch():
    p = plan(world_size=2, micro_batch=32, grad_accum=1)
    check_same_batch(p.batch_shape(), p)
    check_same_batch(None, p)  # a checkpoint from before the batch was recorded
    one_rank = plan(world_size=1, micro_batch=32, grad_accum=1).batch_shape()
    with pytest.raises(ConfigError, match="world_size 1 there, 2 here; global_batch 32 there, 64 here"):
        check_same_batch(one_rank, p)


def test_a_batch_change_keeps_the_images_seen_and_the_epochs_order():
    """--change-batch: the schedule step follows the images seen, the data the epoch's order (all ranks'
    micro batches are consecutive runs of it) down to a whole micro batch of the new world."""
    old = plan(world_size=2, micro_batch=32, grad_accum=2, epochs=10)  # global batch 128
    new = plan(world_size=4, micro_batch=48, epochs=10)  # 192
    state = TrainState(step=1000, epoch=1, batches_in_epoch=14, images_seen=1000 * 128)
    moved, change = rebatch(state, old.batch_shape(), new)
    assert moved.step == 667 and moved.steps_taken == 1000 and moved.images_seen == 128_000  # 666.67 images/192
    # 14 micro batches x 32 x 2 ranks = 896 images of epoch 1 consumed; 4 x 48 x 4 = 768 of them resume
    assert (moved.epoch, moved.batches_in_epoch) == (1, 4)
    row = change.row(0.1, 0.15)
    assert row["event"] == "batch_change" and "loss" not in row and "top1" not in row
    assert (row["step"], row["step_before"], row["image_before"], row["image_after"], row["images_repeated"]) == (
        667, 1000, 896, 768, 128)
    assert change.describe(0.1, 0.15) == (
        "batch changed (--change-batch): world 2 x micro batch 32 x accum 2 = global batch 128 -> world 4 x micro "
        "batch 48 x accum 1 = global batch 192 | step 1000 -> 667 (128000 images seen) | peak lr 0.1 -> 0.15 | "
        "epoch 1 resumes at image 768 of its order, not 896 (128 images seen twice)")
    assert rebatch(state, new.batch_shape(), new) == (state, None)  # the same batch: nothing moves
    with pytest.raises(ConfigError, match=f"at or past this plan's last step {new.total_steps}"):
        rebatch(replace(state, images_seen=new.total_steps * 192 - 90), old.batch_shape(), new)
    with pytest.raises(ConfigError, match="does not record its batch"):
        rebatch(state, None, new)


def test_zero_partitions_refuse_another_world_size(tmp_path):
    def engine(world):  # DeepSpeed's engine at ZeRO 2, as far as the check asks
        return SimpleNamespace(zero_optimization=lambda: True, zero_optimization_stage=lambda: 2, dp_world_size=world)

    for rank in range(2):  # a checkpoint of two ranks at ZeRO 1/2: one optimizer partition each
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    with pytest.raises(ConfigError, match="ZeRO 2's optimizer state partitioned over 2 ranks; it cannot be "
                                          "loaded on 1"):
        check_zero_world_size(engine(1), tmp_path)
    check_zero_world_size(engine(2), tmp_path)
    check_zero_world_size(engine(1), tmp_path / "nothing")  # ZeRO 0: no partitions


def test_the_run_prints_and_saves_its_plan(cli, tmp_path):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, "train.global_batch=64", "train.max_steps=2",
                 "train.eval_every_epochs=10", "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("world 1 x micro batch 32 x accum 2 = global batch 64 | 1438 train images, 22.47 steps/epoch "
            "(22 per pass of the loader)") in result.stdout
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["grad_accum"] == 2 and saved["global_batch"] == 64 and saved["total_steps"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["images_seen"] == 2 * 64


def test_a_global_batch_that_does_not_divide_exits_2_before_writing(cli, tmp_path):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, "train.global_batch=48")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "train.global_batch=48" in lines[0]
    assert not (tmp_path / "run").exists()


LEGACY = {"train.precision": "bf16", "train.ema_decay": 0.5, "train.keep_best": "top1", "train.compile": False}


def test_old_keys_load_into_their_sections():
    cfg = load_config("demo", [f"{key}={value}" for key, value in LEGACY.items()])
    assert (cfg.engine.precision, cfg.ema.decay, cfg.checkpoint.keep_best, cfg.compile.target) == \
        ("bf16", 0.5, "top1", "off")
    with pytest.raises(ConfigError, match="both set"):
        move_legacy_keys({"train": {"precision": "fp16"}, "engine": {"precision": "bf16"}})


def test_a_run_written_in_the_old_layout_resumes(cli, tmp_path):
    """A run directory of the trainer before the split (engine, EMA and checkpoint settings under
    `train` in config.yaml) continues: its settings are read into their sections and compared."""
    short = ["--recipe", "demo", "--run-dir", "run", *TINY, "train.max_steps=4", "train.eval_every_epochs=10",
             "wandb.mode=disabled"]
    first = cli("train", *short, "--stop-at-step", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    path = tmp_path / "run" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for old, new in LEGACY_KEYS.items():  # back to the old layout
        section, key = new.split(".")
        config["train"][old.split(".")[1]] = config[section].pop(key)
    config = {k: v for k, v in config.items() if v != {}}
    assert "engine" not in config and "precision" in config["train"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    resumed = cli("train", *short, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_settings_that_do_not_change_the_numbers_may_change_on_resume(cli, tmp_path):
    short = ["--recipe", "demo", "--run-dir", "run", *TINY, "train.max_steps=4", "wandb.mode=disabled"]
    assert cli("train", *short, "train.log_every_steps=1", "--stop-at-step", "2").returncode == 0
    resumed = cli("train", *short, "train.log_every_steps=2", "data.num_workers=1", "train.collective_timeout_s=600",
                  "checkpoint.keep=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    refused = cli("train", *short, "train.micro_batch=16", "--resume")
    assert refused.returncode == 2 and "train.micro_batch: 32 there, 16 here" in refused.stderr
