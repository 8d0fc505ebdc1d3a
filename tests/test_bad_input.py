"""Bad input, fuzzed through the CLI: numbers that pass a type check but cannot run, YAML's other
readings of a value, refused options, unwritable or damaged directories and files. Each must end
with exit code 2 and one `error: ...` line on stderr, no traceback, and every file that was there
before unchanged (and none added).

Most cases run in this process through `trainer.cli.main` (a config refused at load costs
milliseconds; one refused by the build costs a model and a loader); a few run as `python -m trainer`,
where the process boundary matters (argparse exiting, the import notices of torch and DeepSpeed)."""
import contextlib
import hashlib
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import TINY, image_tree, run_cli
from trainer.cli import main
from trainer.config import load_config

QUIET = ["wandb.mode=disabled", "train.max_steps=1"]
NEW = ["train", "--run-dir", "new", *TINY, *QUIET]  # a fresh run, refused before new/ exists
RESUME = ["train", "--run-dir", "run", "--resume", *TINY, *QUIET]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run, copied into the cases that resume or evaluate it."""
    root = tmp_path_factory.mktemp("finished")
    with contextlib.chdir(root):
        assert main(["train", "--run-dir", "run", *TINY, *QUIET]) == 0
    return root / "run"


# -- what a case finds in its directory before the command runs

def with_run(root: Path, run: Path, stack) -> None:
    shutil.copytree(run, root / "run")


def damaged_config(text: bytes) -> Callable:
    def setup(root: Path, run: Path, stack) -> None:
        with_run(root, run, stack)
        (root / "run" / "config.yaml").write_bytes(text)
    return setup


def corrupt_images(root: Path, run: Path, stack) -> None:
    for name in ("a", "b"):  # 40 files named .jpg in two classes, none an image
        (root / "tree" / name).mkdir(parents=True)
        for k in range(20):
            (root / "tree" / name / f"{k}.jpg").write_text("not a JPEG\n")


def tree(root: Path, run: Path, stack) -> None:
    image_tree(root / "tree", per_class=2, size=(20, 16), classes=("cat", "dog"))


def dangling_link(root: Path, run: Path, stack) -> None:
    tree(root, run, stack)
    (root / "tree" / "cat" / "gone.jpg").symlink_to(root / "nowhere.jpg")


def packed(root: Path, run: Path, stack) -> None:
    tree(root, run, stack)
    (root / "out.lmdb").write_bytes(b"an earlier pack\n")


def weights_file(data: bytes) -> Callable:
    def setup(root: Path, run: Path, stack) -> None:
        (root / "weights.pt").write_bytes(data)
    return setup


def read_only_run(root: Path, run: Path, stack) -> None:
    """The finished run on a tmpfs remounted read-only (root only: skipped where mount is refused)."""
    mount = root / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    stack.callback(subprocess.run, ["umount", "-l", str(mount)], check=True)
    shutil.copytree(run, mount / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


@dataclass
class Case:
    argv: list[str]
    message: str  # a part of the error line that names the problem
    setup: Optional[Callable] = None
    subprocess: bool = False  # run as `python -m trainer` (the process boundary matters)
    warnings: bool = False  # `warning: ...` lines may come before the error (each corrupt image, once)


CASES = {
    # -- numbers that pass a type check but cannot run: refused at load
    "lr infinite": Case([*NEW, "optim.lr=.inf"], "config key 'optim.lr': Input should be a finite number"),
    "lr NaN": Case([*NEW, "optim.lr=.nan"], "config key 'optim.lr': Input should be a finite number"),
    "epochs overflow to inf": Case([*NEW, "train.epochs=1e400"], "config key 'train.epochs': Input should be a finite"),
    "weight decay nan": Case([*NEW, "optim.weight_decay=nan"], "config key 'optim.weight_decay'"),
    "grad clip infinite": Case([*NEW, "engine.grad_clip=.inf"], "config key 'engine.grad_clip'"),
    "mixup alpha infinite": Case([*NEW, "mixup.mode=batch", "mixup.alpha=.inf"], "config key 'mixup.alpha'"),
    "crop scale NaN": Case([*NEW, "data.crop_scale=[0.08, .nan]"], "config key 'data.crop_scale.1'"),
    "collective timeout infinite": Case([*NEW, "train.collective_timeout_s=.inf"],
                                        "config key 'train.collective_timeout_s'"),
    "collective timeout past timedelta": Case([*NEW, "train.collective_timeout_s=1e300"],
                                              "config key 'train.collective_timeout_s': Input should be less than"),
    "wandb timeout past threading": Case([*NEW, "wandb.init_timeout_s=1e300"], "config key 'wandb.init_timeout_s'"),
    "seed negative": Case([*NEW, "seed=-1"], "config key 'seed': Input should be greater than or equal to 0"),
    "seed past 64 bits": Case([*NEW, f"seed={2**70}"], "config key 'seed': Input should be less than"),
    "split seed negative": Case([*NEW, "data.split_seed=-1"], "config key 'data.split_seed'"),
    "image size huge": Case([*NEW, "data.image_size=100000"], "config key 'data.image_size'"),
    "eval resize huge": Case([*NEW, "data.crop_pct=0.001"], "crop_pct 0.001 resizes to image_size / crop_pct"),
    # -- YAML's other readings of a value
    "true for a text setting": Case([*NEW, "model.name=true"], "quote it to mean the text: model.name=\"'true'\""),
    "number for a text setting": Case([*NEW, "wandb.group=2024"], "config key 'wandb.group'"),
    "value not YAML": Case([*NEW, "train.epochs=[1"], "override 'train.epochs=[1': the value is not YAML"),
    "data.path=no taken as the text no": Case([*NEW, "data.source=imagefolder", "data.path=no"],
                                              "data folder no does not exist"),
    # -- numbers whose combination cannot run: refused by the build, before anything is written
    "lr scaled past float32": Case([*NEW, "optim.lr=1e308"], "optim.lr=1e+308 scaled to the global batch"),
    "lr scaled to zero": Case([*NEW, "optim.lr=5e-324"], "is 0: not a learning rate"),
    "epochs overflow the step count": Case([*NEW, "train.epochs=1e308"], "train.epochs=1e+308 is more optimizer steps"),
    "eval interval overflows": Case([*NEW, "train.eval_every_epochs=1e308"], "train.eval_every_epochs=1e+308"),
    "lr decay stairs overflow": Case([*NEW, "schedule.name=tf_staircase", "schedule.warmup_epochs=0",
                                      "schedule.decay_epochs=1e-320", "train.max_steps=3"],
                                     "schedule.decay_epochs=1e-320 is a stair every"),
    "grad_accum too large": Case([*NEW, "train.grad_accum=100000"], "lower train.grad_accum"),
    "global batch too large": Case([*NEW, "train.global_batch=3200000"], "lower train.global_batch"),
    "synthetic images past memory": Case([*NEW, "data.source=synthetic", f"data.synthetic_images={10**12}"],
                                         "data.synthetic_images=1000000000000 at data.image_size 16 need"),
    "every image corrupt": Case([*NEW, "data.source=imagefolder", "data.path=tree", "train.micro_batch=8"],
                                "data: none of the 32 images of this split decodes", corrupt_images, warnings=True),
    # -- the command line
    "--stop-at-step 0": Case([*NEW, "--stop-at-step", "0"], "--stop-at-step: must be at least 1, got 0"),
    "--stop-at-step negative": Case([*NEW, "--stop-at-step", "-4"], "--stop-at-step: must be at least 1, got -4"),
    "--stop-at-step not a number": Case([*NEW, "--stop-at-step", "soon"], "--stop-at-step: not a whole number"),
    "unknown train option": Case([*NEW, "--epochs", "3"], "train: unrecognized arguments: --epochs 3"),
    "unknown verb": Case(["fit"], "argument VERB: invalid choice: 'fit'"),
    "bench train window 0": Case(["bench", "train", "--window", "0"], "--window: must be at least 1"),
    "bench train negative steps": Case(["bench", "train", "--steps", "-1"], "--steps: must be at least 1"),
    "bench train steps short of two windows": Case(["bench", "train", "--steps", "5", "--window", "10"],
                                                   "--steps (5) must give at least two windows"),
    "bench data no images": Case(["bench", "data", "--source", "tree", "--images", "0"], "--images: must be at least 1",
                                 tree),
    "sweep empty variant list": Case(["sweep", "--recipe", "demo", "--variants", ""], "--variants '' names no variant"),
    "sweep only commas": Case(["sweep", "--recipe", "demo", "--variants", ",,"], "--variants ',,' names no variant"),
    "sweep pattern matches nothing": Case(["sweep", "--recipe", "notes_b0", "--variants", "zzz*"],
                                          "has no variant starting with 'zzz'"),
    "sweep zero seeds": Case(["sweep", "--recipe", "demo", "--seeds", "0"], "--seeds: must be at least 1"),
    # -- run directories: unwritable, or a damaged run being resumed
    "run dir under /proc": Case(["train", "--run-dir", "/proc/run", *TINY, *QUIET],
                                "run directory /proc/run cannot be written"),
    "run dir under /sys": Case(["train", "--run-dir", "/sys/run", *TINY, *QUIET], "run directory /sys/run cannot be"),
    "run dir through a file": Case(["train", "--run-dir", "notes.txt/run", *TINY, *QUIET],
                                   "run directory notes.txt/run cannot be written: Not a directory"),
    "resume on a read-only filesystem": Case(["train", "--run-dir", "ro/run", "--resume", *TINY, *QUIET],
                                             "run directory ro/run cannot be written: Read-only file system",
                                             read_only_run),
    "resume, config.yaml not YAML": Case(RESUME, "run/config.yaml is damaged: not YAML", damaged_config(b"data: [\n")),
    "resume, config.yaml a list": Case(RESUME, "run/config.yaml is damaged: a list", damaged_config(b"- 1\n- 2\n")),
    "resume, config.yaml empty": Case(RESUME, "run/config.yaml is damaged: empty", damaged_config(b"")),
    "resume, config.yaml binary": Case(RESUME, "run/config.yaml", damaged_config(bytes(range(256)))),
    # -- pack
    "pack a dangling link": Case(["pack", "tree", "out.lmdb"], "pack: tree/cat/gone.jpg is a link to nothing",
                                 dangling_link),
    "pack into /proc": Case(["pack", "tree", "/proc/out.lmdb"], "pack: cannot write in /proc", tree),
    "pack through a file": Case(["pack", "tree", "notes.txt/out.lmdb"],
                                "pack: cannot write in notes.txt: a file, not a folder", tree),
    "pack over an earlier pack": Case(["pack", "tree", "out.lmdb"], "out.lmdb exists; pass --force", packed),
    # -- eval
    "eval without a source": Case(["eval"], "one of the arguments --run-dir --weights is required"),
    "eval two sources": Case(["eval", "--run-dir", "run", "--weights", "w.pt"], "not allowed with argument"),
    "eval weights not a state dict": Case(["eval", "--weights", "weights.pt", "--recipe", "demo", *TINY],
                                          "--weights weights.pt: not a state dict", weights_file(b"hello")),
    "eval weights empty": Case(["eval", "--weights", "weights.pt", "--recipe", "demo", *TINY],
                               "--weights weights.pt: not a state dict", weights_file(b"")),
    "eval damaged config.yaml": Case(["eval", "--run-dir", "run"], "run/config.yaml is damaged",
                                     damaged_config(b"model: {name: [\n")),
    "eval --out under /proc": Case(["eval", "--run-dir", "run", "--out", "/proc/eval.json"],
                                   "--out /proc/eval.json: cannot write in /proc", with_run),
    "eval --out a folder": Case(["eval", "--run-dir", "run", "--out", "run"], "--out run is a folder", with_run),
    # -- as a process of its own
    "process: unknown option": Case(["train", "--bogus"], "train: unrecognized arguments: --bogus", subprocess=True),
    "process: NaN at load": Case([*NEW, "ema.decay=.nan"], "config key 'ema.decay'", subprocess=True),
    "process: damaged resume": Case(RESUME, "run/config.yaml is damaged: a list", damaged_config(b"- 1\n"),
                                    subprocess=True),
}


def snapshot(root: Path) -> dict:
    """Every path under root, with the bytes of each file (a mount point's content counts too)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
            else "dir" if p.is_dir() else "link" for p in sorted(root.rglob("*"))}


def run_in_process(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)  # pack sets its own
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line_exit_2_and_loses_nothing(name, finished_run, tmp_path, monkeypatch, capfd):
    case = CASES[name]
    root = tmp_path / "case"
    root.mkdir()
    (root / "notes.txt").write_text("a file that was here before\n")
    with contextlib.ExitStack() as stack:
        if case.setup:
            case.setup(root, finished_run, stack)
        before = snapshot(root)
        if case.subprocess:
            result = run_cli(*case.argv, cwd=root, timeout=120)
            code, err = result.returncode, result.stderr
        else:
            monkeypatch.chdir(root)
            code, err = run_in_process(case.argv, capfd)
        assert code == 2, err[-3000:]
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: ") and case.message in lines[-1], lines[-3:]
        others = lines[:-1]
        assert not others or (case.warnings and all(line.startswith("warning: ") for line in others)), others[:3]
        assert snapshot(root) == before


def test_yaml_booleans_of_a_text_setting_are_the_text():
    cfg = load_config("demo", ["data.path=no", "wandb.project=yes", "model.name=on", "wandb.tags=[off, y]",
                               "compile.channels_last=on", "engine.allow_cpu_fp16=yes", "compile.target=false"])
    assert (cfg.data.path, cfg.wandb.project, cfg.model.name, cfg.wandb.tags) == ("no", "yes", "on", ("off", "y"))
    assert cfg.compile.channels_last is True and cfg.engine.allow_cpu_fp16 is True and cfg.compile.target == "off"


def test_the_cases_are_distinct():
    assert len(CASES) >= 40 and len({tuple(case.argv) + (case.setup,) for case in CASES.values()}) == len(CASES)
