"""`python -m trainer sweep`: runs one after another, resumable, one W&B group; --plan for a cluster."""
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, TINY, run_cli

DIGITS = ["data.source=digits", "data.image_size=16", "data.hflip=0", "data.num_workers=0", "data.val_fraction=0.2"]
FAST = [*DIGITS, *TINY, "train.max_steps=3", "train.log_every_steps=1", "wandb.mode=offline"]


def sweep_args(sweep_dir, *extra):
    return ["sweep", "--recipe", "notes_b0", "--variants", "notes/1,notes/3", "--seeds", "1",
            "--sweep-dir", str(sweep_dir), *FAST, *extra]


def test_interrupted_sweep_continues_without_rerunning_finished_runs(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    sweep = subprocess.Popen([sys.executable, "-m", "trainer", *sweep_args(tmp_path / "sw")], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in sweep.stdout:  # stop the sweep as soon as its second run starts
        if line.startswith("[2/2]"):
            sweep.send_signal(signal.SIGTERM)
            break
    sweep.stdout.read()
    assert sweep.wait(timeout=300) == 128 + signal.SIGTERM
    first = tmp_path / "sw" / "notes-1-seed0"
    assert json.loads((first / "summary.json").read_text())["status"] == "completed"
    before = (first / "summary.json").stat().st_mtime_ns, (first / "metrics.jsonl").read_text()

    again = run_cli(*sweep_args(tmp_path / "sw"), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/2] notes/1 seed 0: completed already, skipped" in again.stdout
    assert "[2/2] notes/3 seed 0: training" in again.stdout and "[2/2] notes/3 seed 0: completed" in again.stdout
    assert ((first / "summary.json").stat().st_mtime_ns, (first / "metrics.jsonl").read_text()) == before

    for variant in ("notes/1", "notes/3"):  # one W&B group, the variant as a tag
        run_dir = tmp_path / "sw" / f"{variant.replace('/', '-')}-seed0"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["variant"] == variant and config["seed"] == 0
        assert config["wandb"]["group"] == "sw" and config["wandb"]["tags"] == [variant]
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(r["variant"], r["seed"], r["run_dir"]) for r in manifest["runs"]] == [
        ("notes/1", 0, "notes-1-seed0"), ("notes/3", 0, "notes-3-seed0")]


def test_plan_prints_launcher_lines_the_launcher_parses_and_a_valid_slurm_script(tmp_path):
    # notes/7 and notes/8 have the same settings: one run serves both
    result = run_cli("sweep", "--recipe", "notes_b0", "--variants", "notes/3,notes/7,notes/8", "--seeds", "2",
                     "--plan", "--gpus", "4", "data.path=/data/imagenet/train", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists()  # a plan writes nothing
    lines = [line for line in result.stdout.splitlines() if line.startswith("deepspeed ")]
    assert len(lines) == 4  # notes/3 and notes/7 (= notes/8), 2 seeds each

    from deepspeed.launcher.runner import parse_args as launcher_parse_args
    from trainer.cli import build_parser

    seen = set()
    for line in lines:
        launcher = launcher_parse_args(shlex.split(line)[1:])
        assert launcher.num_gpus == 4 and launcher.module and launcher.user_script == "trainer"
        args, overrides = build_parser().parse_known_args(launcher.user_args)
        assert args.verb == "train" and args.recipe == "notes_b0"
        overrides = [*args.overrides, *overrides]
        assert "resume=auto" in overrides and "data.path=/data/imagenet/train" in overrides
        seen.add((args.variant, next(o for o in overrides if o.startswith("seed="))))
    assert seen == {("notes/3", "seed=0"), ("notes/3", "seed=1"), ("notes/7", "seed=0"), ("notes/7", "seed=1")}

    script = result.stdout.split("# ---- SLURM array script ----\n", 1)[1]
    assert "#SBATCH --array=0-3" in script and script.count(") set -- ") == 4
    (tmp_path / "sweep.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "sweep.sbatch")]).returncode == 0


def test_bad_variant_or_override_stops_the_sweep_before_any_run(tmp_path):
    for args, message in ((["--variants", "notes/1,notes/99"], "has no variant 'notes/99'"),
                          (["--variants", "notes/1", "optim.lrr=1"], "unknown config key 'optim.lrr'")):
        result = run_cli("sweep", "--recipe", "notes_b0", "--sweep-dir", "sw", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error:")
        assert not (tmp_path / "sw").exists()


def test_prefix_selects_variants_in_recipe_order():
    from trainer.tools.sweep import select_variants

    assert select_variants("notes_b0", "notes/4,notes/1*")[:3] == ["notes/4", "notes/1", "notes/10"]
    assert len(select_variants("notes_b0", "notes/*")) == 42
    assert select_variants("demo", None) == [None]


def test_sweep_help_names_plan_and_seeds():
    result = run_cli("sweep", "--help", cwd=REPO)
    assert result.returncode == 0 and "--plan" in result.stdout and "--seeds" in result.stdout


def test_the_proxy_protocol_plans_every_row_once_per_seed_with_its_precision(tmp_path):
    """`--proxy cifar10`: the protocol's rows x its 2 seeds; fp16 only for the rows whose change is fp16;
    rows the fp32 stand-in makes equal (6-9 are 4) run once; the label thresholds go in sweep.json."""
    from trainer.tools.sweep import plan_proxy, read_proxy, write_manifest

    runs = plan_proxy("cifar10", Path("sw"), None, ["data.path=/somewhere"])
    assert {r.seed for r in runs} == {0, 1} and len(runs) == 2 * len({r.variant for r in runs})
    rows = {r.variant: r for r in runs if r.seed == 0}
    assert "engine.allow_cpu_fp16=true" in rows["notes/23"].overrides
    assert "engine.precision=fp32" in rows["notes/37"].overrides and "engine.precision=fp32" in rows["notes/6"].overrides
    assert rows["notes/6"].same_as == rows["notes/4"].run_dir and rows["notes/9"].same_as == rows["notes/4"].run_dir
    assert rows["notes/5"].same_as is None and rows["notes/23"].same_as is None
    assert rows["notes/1"].overrides[-1] == "data.path=/somewhere"  # the user's settings come last
    assert len(plan_proxy("cifar10", Path("sw"), 1, [], only="notes/1,notes/23")) == 2

    write_manifest(runs, tmp_path / "sw", "cifar10")
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert manifest["proxy"] == "cifar10" and manifest["labels"] == read_proxy("cifar10")["labels"]
    assert manifest["labels"]["fail_below"] < manifest["labels"]["learned_from"]


def test_a_proxy_plan_launches_one_process_per_run(tmp_path):
    """The proxy's global batches are one process's: its plan must not put 8 ranks on them."""
    result = run_cli("sweep", "--proxy", "cifar10", "--variants", "notes/1", "--plan", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("deepspeed ")]
    assert len(lines) == 2 and all(line.startswith("deepspeed --num_gpus 1 ") for line in lines)
    assert "#SBATCH --gpus-per-node=1" in result.stdout and not (tmp_path / "runs").exists()


def test_a_proxy_run_in_parts_keeps_the_whole_protocol_in_its_manifest(tmp_path):
    """--variants runs some rows first; sweep.json still lists every row, so the report counts the rest as
    not run yet (and a later full run does not need to rewrite it to be reported)."""
    result = run_cli("sweep", "--proxy", "cifar10", "--variants", "notes/1", "--seeds", "1", *FAST,
                     "engine.precision=fp32", "compile.channels_last=false", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "proxy-cifar10" / "sweep.json").read_text())
    listed = {entry["variant"] for entry in manifest["runs"]}
    assert {"notes/1", "notes/5", "notes/23", "notes/42"} <= listed and len(manifest["runs"]) == len(listed)
    assert [p.name for p in (tmp_path / "runs" / "proxy-cifar10").glob("*/summary.json")] == ["summary.json"]


def test_an_unknown_proxy_is_one_line(tmp_path):
    result = run_cli("sweep", "--proxy", "imagenet-tiny", cwd=tmp_path)
    assert result.returncode == 2 and "no protocol 'imagenet-tiny'; available: cifar10" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "runs").exists()


def test_jobs_run_side_by_side(tmp_path):
    result = run_cli(*sweep_args(tmp_path / "sw", "--jobs", "2"), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if ": training in " in line]
    finished = [i for i, line in enumerate(lines) if ": completed (exit 0)" in line]
    assert len(started) == len(finished) == 2 and max(started) < min(finished)  # both ran at once
