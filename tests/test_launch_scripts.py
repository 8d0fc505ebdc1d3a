"""launch/gpu_check.sh on a CPU machine: its dry run, the trainer lines it prints (through the real
argument parser and each verb's own checks, nothing trained), and its stage bookkeeping with fakes."""
import os
import shlex
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import REPO

from trainer import cli

SCRIPT = REPO / "launch" / "gpu_check.sh"
ROWS = "notes/1,notes/5,notes/23,notes/37"


def gpu_check(out: Path, *args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def main_status(argv: list[str]) -> int:
    """cli.main's status; the parser's refusal (sys.exit(2)) as a status too."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def test_scripts_parse():
    for script in ("gpu_check.sh", "bench_gpu.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0, script


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path):
    data = tmp_path / "cifar10-train"
    data.mkdir()
    out = tmp_path / "out"
    done = gpu_check(out, "--dry-run", env={"CIFAR10_DIR": str(data), "PY": sys.executable})
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and not any(out.iterdir())  # created, nothing written in it
    commands = [line.strip() for line in done.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert any("bash launch/bench_gpu.sh" in line for line in commands)
    trainer_lines = [shlex.split(line.split(" -m trainer ", 1)[1]) for line in commands if " -m trainer " in line]
    verbs = [args[0] for args in trainer_lines]
    assert verbs == ["bench", "bench", "sweep", "report"], done.stdout
    sweep = trainer_lines[2]
    assert sweep[:5] == ["sweep", "--proxy", "cifar10", "--variants", ROWS]
    assert sweep[sweep.index("--sweep-dir") + 1] == str(out / "proxy") and f"data.path={data}" in sweep
    assert trainer_lines[3] == ["report", "--sweep", str(out / "proxy"), "--out", str(out / "report")]


def test_dry_run_trainer_lines_pass_the_trainer_cli(tmp_path, monkeypatch, capsys):
    """Each printed `python -m trainer` line through cli.main: bench with its benchmark replaced (its
    --modes/--steps checks run), sweep with --plan (every run's config is built and validated),
    report with the notebooks replaced."""
    data = tmp_path / "cifar10-train"
    data.mkdir()
    done = gpu_check(tmp_path / "out", "--dry-run", env={"CIFAR10_DIR": str(data), "PY": sys.executable})
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(line.split(" -m trainer ", 1)[1]) for line in done.stdout.splitlines() if " -m trainer " in line]

    benched = []
    fake_bench = types.ModuleType("trainer.tools.bench_train")
    fake_bench.bench_train = lambda args: benched.append(args) or []
    fake_bench.print_table = lambda rows, args: None
    monkeypatch.setitem(sys.modules, "trainer.tools.bench_train", fake_bench)
    import trainer.tools.report as report_module
    reported = []
    monkeypatch.setattr(report_module, "report", lambda *args: reported.append(args) or [])

    for args in lines:
        if args[0] == "sweep":
            capsys.readouterr()
            assert main_status([*args, "--plan"]) == 0, args
            plan = capsys.readouterr().out
            launches = [line for line in plan.splitlines() if line.startswith("deepspeed ")]
            assert len(launches) == 8  # 4 rows x the proxy's 2 seeds
            for row in ROWS.split(","):
                assert sum(f"--variant {row} " in line for line in launches) == 2, row
            assert all(f"data.path={data}" in line for line in launches)
        else:
            assert main_status(args) == 0, args
    assert [(a.precision, a.image_size, a.batch, a.modes) for a in benched] == [
        ("bf16", 224, 256, ["eager", "compiled"]), ("fp16", 224, 256, ["eager", "compiled"])]
    assert [(out.name, [d.name for d in sweeps]) for out, sweeps, *_ in reported] == [("report", ["proxy"])]


def test_missing_data_stops_before_anything(tmp_path):
    out = tmp_path / "out"
    done = gpu_check(out, "--dry-run", env={"CIFAR10_DIR": str(tmp_path / "nowhere")})
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "CIFAR10_DIR" in done.stderr
    assert not out.exists()


def executable(path: Path, body: str) -> Path:
    path.write_text(f"#!/usr/bin/env bash\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_stages_time_out_fail_and_go_on(tmp_path):
    """A fake python: bench hangs (its stage times out), sweep succeeds, report fails; every stage
    still runs, summary.txt has a line each, and the exit status says one failed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", "echo 'Fake GPU, 1.0, 80 GiB'\n")
    fake_python = executable(bin_dir / "python", 'case $3 in\n'
                                                  '  bench) sleep 30 ;;\n'
                                                  '  sweep) echo "swept: $*" ;;\n'
                                                  '  *) echo "error: no sweep.json" >&2; exit 3 ;;\n'
                                                  'esac\n')
    data = tmp_path / "cifar10-train"
    data.mkdir()
    out = tmp_path / "out"
    done = gpu_check(out, env={"CIFAR10_DIR": str(data), "PY": str(fake_python), "SPEED_TIMEOUT": "1",
                               "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 1, done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in summary] == ["speed: timed out", "proxy: ok", "report: failed (exit 3)"]
    assert (out / "speed.txt").read_text().startswith("Fake GPU")  # what the stage printed before its timeout
    assert f"--sweep-dir {out / 'proxy'}" in (out / "proxy.log").read_text()
    assert "no sweep.json" in (out / "report.log").read_text()
