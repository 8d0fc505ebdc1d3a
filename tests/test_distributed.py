"""Two ranks through the real `deepspeed` launcher, on the CPU with gloo: a completed run, the same
training as one rank with the global batch, a two-rank checkpoint resumed on two ranks, a stop
signal agreed by all ranks, corrupt files counted over both ranks, and a dead or stuck rank that
ends the launch instead of hanging it.

Each rank runs with OMP_NUM_THREADS=1: two ranks with all cores each oversubscribe a small machine."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import GROUP_VARIABLES, image_tree, read_jsonl, run_cli
from trainer.data.sources import FolderImages, split_indices

LAUNCHER = Path(sys.executable).parent / "deepspeed"
MICRO_BATCH = 16
# fp32, no dropout or drop-path, no mixup/erasing (demo has none), SGD (Adam would blow float noise on
# zero-gradient biases up to a full lr-sized step), no warmup so the weights move from step 1
SAME_TRAINING = ["model.name=test_efficientnet", "data.image_size=16", "model.sync_bn=true",
                 "model.drop_rate=0", "model.drop_path_rate=0", "optim.name=sgd", "optim.lr=0.8",
                 "optim.wd_form=coupled", "optim.weight_decay=1e-5", "schedule.warmup_epochs=0",
                 "ema.decay=0.5", "train.max_steps=4", "train.log_every_steps=1",
                 "train.eval_every_epochs=100", "checkpoint.every_epochs=100"]
# a long run for the tests that signal or kill a rank mid-run
LONG = ["model.name=test_efficientnet", "data.image_size=16", f"train.micro_batch={MICRO_BATCH}",
        "train.max_steps=10000", "train.log_every_steps=1", "train.eval_every_epochs=100",
        "checkpoint.every_epochs=100", "wandb.mode=disabled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*GROUP_VARIABLES, "WANDB_MODE", "WANDB_API_KEY")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the launcher passes both to each rank


def launch_command(*args, ranks: int = 2) -> list[str]:
    return [str(LAUNCHER), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            "--module", "trainer", "train", "--recipe", "demo", *map(str, args)]


def launch(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(*args), cwd=cwd, env=launcher_env(), capture_output=True, text=True,
                          timeout=timeout)


def start(*args, cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: nobody reads it while the run goes on
        return subprocess.Popen(launch_command(*args), cwd=cwd, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def wait_for_first_step(process: subprocess.Popen, run_dir: Path, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, f"the launch ended before its first step:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no step within {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of one rank: the launcher's descendant started with --local_rank=<rank>."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in child.cmdline():
            return child
    raise AssertionError(f"no process for rank {rank} under the launcher")


def model_states(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def assert_same_weights(run_a: Path, run_b: Path, step: int) -> None:
    a, b = model_states(run_a, step), model_states(run_b, step)
    for key in ("module", "ema"):  # the trained weights with the BN statistics, and their EMA
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks x micro batch 16 with SyncBN, 4 steps, W&B offline: the run the tests below compare with."""
    cwd = tmp_path_factory.mktemp("two_ranks")
    result = launch("--run-dir", "run", *SAME_TRAINING, f"train.micro_batch={MICRO_BATCH}", "wandb.mode=offline",
                    cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "run", result


def test_two_ranks_complete_a_run_written_by_rank_0_only(two_ranks):
    run, result = two_ranks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["images_seen"] == 4 * 2 * MICRO_BATCH  # global batch = world x micro batch x accumulation
    assert "world 2 x micro batch 16 x accum 1 = global batch 32" in result.stdout
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one writer: no row twice
    assert [r["val_images"] for r in rows if "top1" in r] == [359]  # each val image once over both ranks
    # the lr is scaled by the global batch: 0.8 per 256 images x 32 images (cosine, no warmup: the peak first)
    assert next(r["lr"] for r in rows if "loss" in r) == pytest.approx(0.8 * 32 / 256)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one W&B run, rank 0's
    assert result.stdout.count("run demo: ") == 1  # one banner, one progress bar owner


def test_sync_bn_converts_timm_bn_act_layers_and_keeps_their_activation():
    from timm.layers import BatchNormAct2d

    from trainer.config import ModelConfig
    from trainer.model import build_model
    from trainer.syncbn import SyncBatchNormAct

    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="test_efficientnet", drop_rate=0, drop_path_rate=0), 10)
    torch.manual_seed(0)
    synced = build_model(ModelConfig(name="test_efficientnet", drop_rate=0, drop_path_rate=0, sync_bn=True), 10)
    bns = [m for m in plain.modules() if isinstance(m, BatchNormAct2d)]
    converted = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and len(converted) == len(bns) and all(type(m) is SyncBatchNormAct for m in converted)
    assert [type(m.act) for m in converted] == [type(m.act) for m in bns]  # torch's converter drops them
    assert [m.momentum for m in converted] == [m.momentum for m in bns] == [pytest.approx(0.01)] * len(bns)
    assert plain.state_dict().keys() == synced.state_dict().keys()  # checkpoints and the EMA line up
    x = torch.randn(4, 3, 16, 16)
    for train in (True, False):  # one process: exactly plain BN
        plain.train(train), synced.train(train)
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_global_batch_of_two_ranks_is_the_batch_of_one_rank():
    """DistributedSampler gives rank r the positions r, r+2, ... of the epoch's permutation: step k of
    2 ranks x B holds the same images as step k of 1 rank x 2B."""
    from trainer.config import DataConfig
    from trainer.data.loaders import build_loaders

    def steps(rank, world, micro):
        loaders = build_loaders(DataConfig(image_size=16), micro, seed=0, rank=rank, world_size=world)
        loaders.start_epoch(1)
        indices = list(loaders.train_sampler)
        return [set(indices[i:i + micro]) for i in range(0, len(indices) - micro + 1, micro)]

    one = steps(0, 1, 2 * MICRO_BATCH)
    two = [a | b for a, b in zip(steps(0, 2, MICRO_BATCH), steps(1, 2, MICRO_BATCH))]
    assert len(two) == len(one) and two == one


def test_two_ranks_with_syncbn_train_like_one_rank_with_the_global_batch(two_ranks, tmp_path):
    run2, _ = two_ranks
    one = run_cli("train", "--recipe", "demo", "--run-dir", "run", *SAME_TRAINING,
                  f"train.micro_batch={2 * MICRO_BATCH}", "wandb.mode=disabled",
                  "checkpoint.every_epochs=0.05", cwd=tmp_path,  # 44 steps/epoch: also a step-2 checkpoint
                  env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    run1 = tmp_path / "run"
    # the logged loss is the mean over the global batch on both; fp32 sums in another order differ ~1e-7
    assert losses(run2) == pytest.approx(losses(run1), rel=1e-5)
    assert_same_weights(run2, run1, step=4)
    # the weights move far more than that tolerance in two steps: the comparison can tell runs apart
    before, after = model_states(run1, 2)["module"], model_states(run1, 4)["module"]
    assert max((after[k] - before[k]).abs().max().item() for k in after if after[k].is_floating_point()) > 1e-2


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_two_ranks(two_ranks, tmp_path):
    args = ["--run-dir", "run", *SAME_TRAINING, f"train.micro_batch={MICRO_BATCH}", "wandb.mode=disabled"]
    first = launch(*args, "--stop-at-step", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"

    second = launch(*args, "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    # stopping and resuming changed nothing: the same losses and weights as the uninterrupted run
    uninterrupted, _ = two_ranks
    assert losses(run) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert_same_weights(run, uninterrupted, step=4)


def test_corrupt_files_met_by_rank_1_only_are_counted_in_rank_0s_metrics(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=8, size=(24, 20), classes=("a", "b"))  # 16: 12 train, 4 val
    source = FolderImages(str(tree))
    _, val = split_indices(len(source), val_fraction=0.25, seed=0)
    # rank 1 evaluates val positions 1 and 3; each one's replacement, the next position, is good
    bad = [source.name(i) for i in val[1::2]]
    for path in bad:
        Path(path).write_text("this is a text file, not an image\n")
    result = launch("--run-dir", "run", "model.name=test_efficientnet", "data.image_size=16", "data.source=imagefolder",
                    f"data.path={tree}", "data.val_fraction=0.25", "data.split_seed=0", "data.num_workers=1",
                    "train.micro_batch=3", "train.epochs=1", "wandb.mode=disabled", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert all(output.count(path) == 1 for path in bad), output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # written by rank 0
    assert summary["status"] == "completed" and summary["corrupt_images"] == 2


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    log = tmp_path / "launch.log"
    # ZeRO 1: every rank writes its own optimizer partition, so the checkpoint shows who wrote it
    launcher = start("--run-dir", "run", *LONG, "engine.zero_stage=1", cwd=tmp_path, log=log)
    try:
        wait_for_first_step(launcher, tmp_path / "run", log)
        rank_process(launcher, 1).send_signal(signal.SIGTERM)  # rank 1 only; rank 0 never sees a signal
        assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        launcher.kill()
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 10000
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{summary['steps']:08d}"
    partitions = sorted(p.name for p in (run / "checkpoints" / tag).glob("*optim_states.pt"))
    assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_killed_rank_ends_the_launch_with_an_error(tmp_path):
    log = tmp_path / "launch.log"
    launcher = start("--run-dir", "run", *LONG, "train.collective_timeout_s=30", cwd=tmp_path, log=log)
    try:
        wait_for_first_step(launcher, tmp_path / "run", log)
        survivor = rank_process(launcher, 0)
        rank_process(launcher, 1).kill()
        killed_at = time.time()
        code = launcher.wait(timeout=90)
        waited = time.time() - killed_at
    finally:
        launcher.kill()
    assert code != 0, log.read_text()[-3000:]
    assert waited < 30, f"the launch took {waited:.0f}s to end after a rank died"
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_a_stuck_rank_times_out_the_others(tmp_path):
    """A rank that hangs (stopped, not dead: the launcher sees nothing) ends the run through the
    collective timeout: rank 0 raises, exits non-zero, and the launcher then ends rank 1."""
    log = tmp_path / "launch.log"
    timeout_s = 15
    launcher = start("--run-dir", "run", *LONG, f"train.collective_timeout_s={timeout_s}", cwd=tmp_path, log=log)
    stuck = None
    try:
        wait_for_first_step(launcher, tmp_path / "run", log)
        stuck = rank_process(launcher, 1)
        stuck.suspend()  # SIGSTOP
        stopped_at = time.time()
        rank0 = rank_process(launcher, 0)
        rank0.wait(timeout=timeout_s + 60)
        waited = time.time() - stopped_at
        # the launcher sends SIGTERM to the stopped rank, then SIGKILL after its own 30 s grace
        code = launcher.wait(timeout=60)
    finally:
        launcher.kill()
        if stuck is not None and stuck.is_running():
            stuck.kill()
    assert code != 0
    assert timeout_s <= waited < timeout_s + 30, f"rank 0 ended {waited:.0f}s after rank 1 stopped"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
