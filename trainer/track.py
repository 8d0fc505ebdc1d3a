"""What a run leaves behind: metrics.jsonl, summary.json and a W&B run.

Only rank 0 writes. The local files are the record the notebooks read first;
W&B mirrors them, and a W&B failure never stops training."""
from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from . import log
from .config import WandbConfig


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path`, flush to disk, then rename over it: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    return float(value)


def _finite_or_none(value):
    # JSON has no NaN/inf; a non-finite loss is written as a string so it stays visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def wandb_mode(mode: str) -> str:
    """auto: online only if this user has configured W&B (key or WANDB_MODE), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_login = False
    return "online" if has_login else "offline"


class Tracker:
    """Metrics to metrics.jsonl (append, one object per line) and to W&B."""

    def __init__(self, run_dir: Path, config: dict, cfg: WandbConfig, name: str, enabled: bool,
                 resume_steps_taken: int = 0):
        """resume_steps_taken: the steps taken where the run starts (its checkpoint's TrainState.steps_taken;
        0 when fresh)."""
        self.run_dir, self.enabled = run_dir, enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        if enabled:
            self._drop_rows_after(resume_steps_taken)
        self.wandb_run = self._start_wandb(config, cfg, name) if enabled else None

    def _drop_rows_after(self, steps_taken: int) -> None:
        """Rows a killed run logged after its last checkpoint are logged again by the resumed run:
        drop them, so the file holds each step once. Counted in steps taken, which never go back
        (`step` may, after a batch change). Replaced atomically; a torn last line goes too."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the half-written line of a killed run
                continue
            if row_position(row) <= steps_taken:
                kept.append(line + "\n")
        write_text_atomic(self.metrics_path, "".join(kept))

    def _start_wandb(self, config: dict, cfg: WandbConfig, name: str):
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_id.txt"  # a resumed run continues the same W&B run
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            kwargs = dict(dir=str(self.run_dir), config=config, name=name, id=run_id, resume="allow",
                          project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags))
            try:
                settings = wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True)
                return wandb.init(mode=mode, settings=settings, **kwargs)
            except Exception as err:  # noqa: BLE001 - server unreachable, bad key, ...
                if mode != "online":
                    raise
                reason = " ".join(str(err).split())  # wandb's messages span lines; a warning is one
                log.warning(f"W&B online failed ({type(err).__name__}: {reason}); logging offline instead")
                # the failed run still holds its id in wandb's service process: end that process first
                wandb.teardown()
                return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            log.warning(f"W&B disabled for this run: {type(err).__name__}: {err}")
            return None

    def log(self, metrics: dict[str, Any], steps_taken: Optional[int] = None) -> None:
        """One row. steps_taken (TrainState.steps_taken) joins the row only where it differs from its
        `step` (after a batch change), so a run without one logs the rows it always did; it is W&B's
        step, which must never go back."""
        if not self.enabled:
            return
        if steps_taken is not None and steps_taken != metrics["step"]:
            metrics = {**metrics, "steps_taken": steps_taken}
        row = {k: _finite_or_none(v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb_call(lambda run: run.log(metrics, step=row_position(metrics)))

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / "summary.json", summary)
        self._wandb_call(lambda run: run.summary.update(summary))

    def finish(self, exit_code: int = 0) -> None:
        self._wandb_call(lambda run: run.finish(exit_code=exit_code))
        self.wandb_run = None

    def _wandb_call(self, call) -> None:
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as err:  # noqa: BLE001
            log.warning(f"W&B call failed, W&B disabled for the rest of the run: {err}")
            self.wandb_run = None


def row_position(row: dict) -> int:
    """A metrics row's place in the run, which never goes back: its steps_taken, else its step. An event
    row (a batch change) is logged when a session starts, after the checkpoint it resumed: it counts
    with the next step, so a resume from that checkpoint drops it, and a resumed W&B run, already at
    the checkpoint's step, takes it (with the next step's row)."""
    return int(row.get("steps_taken", row.get("step", 0))) + ("event" in row)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_config(run_dir: Path) -> dict:
    """A run's config.yaml as a dict in this trainer's layout (settings an earlier trainer kept under
    `train` moved to their sections), so runs of both ages read alike. ConfigError, on one line, when
    the file cannot be read or is not a mapping of settings (damaged or truncated)."""
    import yaml

    from .config import ConfigError, move_legacy_keys

    path = Path(run_dir) / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        where = f", line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise ConfigError(f"{path} is damaged: not YAML ({err.problem or err.context}{where})") from None
    except (OSError, ValueError, yaml.YAMLError) as err:  # unreadable, not UTF-8
        raise ConfigError(f"{path} cannot be read ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        what = "empty" if tree is None else f"a {type(tree).__name__}"
        raise ConfigError(f"{path} is damaged: {what}, not a mapping of settings")
    return move_legacy_keys(tree)
