"""Sweeps: one training run per (variant, seed) of a recipe, one after another on this machine,
or as commands for a cluster (`--plan`). Every run goes in one W&B group, tagged with its variant."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, load_config, read_recipe
from ..track import read_summary, write_json_atomic

PROXIES = Path(__file__).parent / "proxies"

# a run with one of these statuses is a result (a collapse is the notes' outcome for some rows)
FINISHED = ("completed", "collapsed")


@dataclass(frozen=True)
class SweepRun:
    recipe: str
    variant: Optional[str]
    seed: int
    run_dir: Path
    group: str
    overrides: tuple[str, ...]
    same_as: Optional[Path] = None  # an earlier run of this sweep with exactly this config: not run twice

    @property
    def label(self) -> str:
        return f"{self.variant or self.recipe} seed {self.seed}"

    def config_overrides(self) -> list[str]:
        tags = f"wandb.tags=[{self.variant}]" if self.variant else "wandb.tags=[]"
        return [f"seed={self.seed}", f"wandb.group={self.group}", tags, *self.overrides]

    def train_args(self) -> list[str]:
        """The arguments after `train`; resume=auto makes the same line start, continue or requeue it."""
        args = ["--recipe", self.recipe, "--run-dir", str(self.run_dir)]
        if self.variant:
            args += ["--variant", self.variant]
        return args + self.config_overrides() + ["resume=auto"]

    def status(self) -> Optional[str]:
        summary = read_summary(self.run_dir)
        return summary["status"] if summary else None


def plan_runs(recipe: str, variants: list[Optional[str]], seeds: int, sweep_dir: Path,
              overrides: list[str], group: Optional[str] = None) -> list[SweepRun]:
    """Every (variant, seed), variant-major; each config is validated here, so a bad variant
    or override stops the sweep before its first run (ConfigError). Variants that come out equal
    (the notes repeat settings: rows 26, 27 and 29 are row 13) point at the first one's runs."""
    group = group or sweep_dir.name
    runs, first_with = [], {}
    for variant in variants:
        for seed in range(seeds):
            name = (variant or recipe).replace("/", "-")
            run = SweepRun(recipe, variant, seed, sweep_dir / f"{name}-seed{seed}", group, tuple(overrides))
            settings = load_config(recipe, run.config_overrides(), variant=variant).to_dict()
            for label in ("name", "variant", "wandb"):
                settings.pop(label)
            key = json.dumps(settings, sort_keys=True)
            if key in first_with:
                run = replace(run, same_as=first_with[key])
            first_with.setdefault(key, run.run_dir)
            runs.append(run)
    return runs


def read_proxy(name: str) -> dict:
    """A named proxy protocol (trainer/tools/proxies/NAME.yaml): a recipe, its seeds, the settings
    of every run, and parts of variants with their own settings (e.g. a precision)."""
    path = PROXIES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROXIES.glob("*.yaml"))
        raise ConfigError(f"--proxy: no protocol {name!r}; available: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def plan_proxy(name: str, sweep_dir: Path, seeds: Optional[int], overrides: list[str],
               only: Optional[str] = None, group: Optional[str] = None) -> list[SweepRun]:
    """Every part of the protocol, each part's variants x the protocol's seeds (or `seeds`);
    `overrides` come after the protocol's own; `only` (a --variants spec) keeps a subset."""
    proxy = read_proxy(name)
    recipe, chosen = proxy["recipe"], select_variants(proxy["recipe"], only) if only else None
    runs = []
    for part in proxy["parts"].values():
        variants = [v for v in select_variants(recipe, part["variants"]) if chosen is None or v in chosen]
        if variants:
            runs += plan_runs(recipe, variants, seeds or proxy["seeds"], sweep_dir,
                              [*proxy["overrides"], *part.get("overrides", []), *overrides], group)
    if not runs:
        raise ConfigError(f"--variants {only!r}: none of them is in the {name} protocol")
    return runs


def write_manifest(runs: list[SweepRun], sweep_dir: Path, proxy: Optional[str] = None) -> None:
    """sweep.json: every (variant, seed) and the run directory holding its result, for the notebooks;
    for a proxy its name and its label thresholds, fixed before the runs."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    labels = {"proxy": proxy, "labels": read_proxy(proxy)["labels"]} if proxy else {}
    write_json_atomic(sweep_dir / "sweep.json", {"recipe": runs[0].recipe, "group": runs[0].group, **labels, "runs": [
        {"variant": r.variant, "seed": r.seed, "run_dir": (r.same_as or r.run_dir).name,
         "same_as": r.same_as.name if r.same_as else None} for r in runs]})


def run_sweep(runs: list[SweepRun], jobs: int = 1) -> int:
    """Run each unfinished run to its end in a child process (a fresh DeepSpeed, W&B and torch
    state per run), `jobs` at a time (each then gets cores / jobs threads unless OMP_NUM_THREADS
    is set). SIGINT/SIGTERM stop the running children cleanly (they checkpoint) and end the sweep;
    the same command later continues it. Exit 1 if a run failed."""
    stopping = []
    active: dict[subprocess.Popen, tuple[str, SweepRun]] = {}

    def stop(signum, frame):
        stopping.append(signum)
        for child in list(active):  # passed on: a run counts a copy of a signal it also got from its group as one request
            child.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    env = single_process_env(jobs)
    failed = []
    try:
        queue = list(enumerate(runs, 1))
        while queue or active:
            while queue and len(active) < jobs and not stopping:
                index, run = queue.pop(0)
                head = f"[{index}/{len(runs)}] {run.label}"
                if run.same_as:
                    print(f"{head}: same settings as {run.same_as.name}, not run again", flush=True)
                elif run.status() in FINISHED:
                    print(f"{head}: {run.status()} already, skipped ({run.run_dir})", flush=True)
                else:
                    child = start_run(run, env, head)
                    active[child] = (head, run)
                    if stopping:  # the signal came while this run was starting
                        child.send_signal(signal.SIGTERM)
            if stopping and not active:
                break
            time.sleep(0.2)
            for child, (head, run) in [(c, item) for c, item in active.items() if c.poll() is not None]:
                del active[child]
                status = run.status()
                print(f"{head}: {status or 'no summary'} (exit {child.returncode}){describe(run)}", flush=True)
                if status not in FINISHED and not stopping:
                    failed.append(run)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopping:
        print("sweep stopped; run the same command again to continue it", file=sys.stderr)
        return 128 + stopping[0]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(r.label for r in failed)} "
              f"(logs beside their run directories)", file=sys.stderr)
        return 1
    return 0


def start_run(run: SweepRun, env: dict[str, str], head: str) -> subprocess.Popen:
    print(f"{head}: training in {run.run_dir}", flush=True)
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir.parent / f"{run.run_dir.name}.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer", "train", *run.train_args()],
                                stdout=log, stderr=subprocess.STDOUT, env=env)


def single_process_env(jobs: int = 1) -> dict[str, str]:
    """This environment without a process group's variables: each run here is one process of its
    own (inherited from a launcher, or from a test that made a group, they would make the run join
    that group's rendezvous, on a port already taken). Runs side by side share the cores: torch's
    default of one thread per core in each would oversubscribe them (on 2 cores, ~50x slower)."""
    group = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {name: value for name, value in os.environ.items() if name not in group}
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def describe(run: SweepRun) -> str:
    summary = read_summary(run.run_dir) or {}
    if summary.get("top1") is None:
        return ""
    return f": top1 {summary['top1']:.2f}, EMA top1 {summary['ema_top1']:.2f}"


# -- cluster commands

def launcher_line(run: SweepRun, gpus: int) -> str:
    return shlex.join(["deepspeed", "--num_gpus", str(gpus), "--module", "trainer", "train", *run.train_args()])


def slurm_array_script(runs: list[SweepRun], gpus: int, repo: Path) -> str:
    """One array task per run, each a one-node DeepSpeed launch; requeue-safe (resume=auto)."""
    runs = [run for run in runs if not run.same_as]
    cases = "\n".join(f"    {i}) set -- {shlex.join(run.train_args())} ;;" for i, run in enumerate(runs))
    return f"""#!/usr/bin/env bash
# Sweep {runs[0].group}: {len(runs)} runs, one SLURM array task each (sbatch this file).
# A task killed at its time limit (SIGTERM 10 min before: it checkpoints) continues when requeued.
#SBATCH --job-name={runs[0].group}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@600
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
cd {shlex.quote(str(repo))}
source .venv/bin/activate
case "$SLURM_ARRAY_TASK_ID" in
{cases}
    *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
exec deepspeed --num_gpus {gpus} --master_port $((20000 + SLURM_JOB_ID % 20000)) --module trainer train "$@"
"""


def print_plan(runs: list[SweepRun], gpus: int, repo: Path) -> None:
    print(f"# {sum(not r.same_as for r in runs)} runs, one node of {gpus} GPUs each: run these lines anywhere one after another,")
    print("# or submit the SLURM array script below (one task per run)")
    for run in runs:
        if not run.same_as:
            print(launcher_line(run, gpus))
    print("\n# ---- SLURM array script ----")
    print(slurm_array_script(runs, gpus, repo), end="")


def select_variants(recipe: str, spec: Optional[str]) -> list[Optional[str]]:
    """`a,b`; `all`; `notes/*` (a prefix); none: the recipe itself. Unknown names: ConfigError."""
    if spec is None:
        return [None]
    known = list(read_recipe(recipe).get("variants") or {})
    if not spec.strip(", "):  # --variants '' (an unset shell variable) names none: not the recipe itself
        raise ConfigError(f"--variants {spec!r} names no variant; available: {', '.join(known) or 'none'} "
                          f"(leave --variants out to sweep the recipe as it is)")
    chosen = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        matches = (known if item == "all" else [v for v in known if v.startswith(item[:-1])] if item.endswith("*")
                   else [item] if item in known else [])
        if not matches:
            what = "no variant starting with" if item.endswith("*") else "no variant"
            raise ConfigError(f"recipe {recipe!r} has {what} {item.removesuffix('*')!r}; available: "
                              f"{', '.join(known) or 'none'}")
        chosen += [v for v in matches if v not in chosen]
    return chosen
