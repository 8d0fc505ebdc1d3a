"""Reports: the notebooks executed headless on given runs and rendered as Markdown.

    python -m trainer report --sweep runs/sweep-notes_b0 --healthy runs/fp16 --collapsed runs/fp16-rmsprop \
        [--search runs/fp16-lr0.1 runs/fp16-lr1]

writes reports/ablations.md and reports/loss_scale_collapse.md, each with its PNG figures in
<name>_files/ beside it. The notebooks (notebooks/*.ipynb) take their inputs from environment
variables only and run in a fresh kernel whose working directory is this process's (the repository
root, where their defaults point); they only read run files."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..config import ConfigError

# beside the package, not inside it: found through the editable install of this repository
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # the repository's, beside trainer/


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the CLI prints it on one line and exits 1."""


def markdown_table(frame, index: bool = False) -> str:
    """A DataFrame as a GitHub Markdown table: cells as str, NaN/None empty, pipes escaped."""
    frame = frame.reset_index() if index else frame

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def sweep_variants(sweep_dir: Path) -> list[str]:
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    return [entry["variant"] or "" for entry in manifest["runs"]]


def ablations_env(sweep_dirs: list[Path], baseline: Optional[str]) -> dict[str, str]:
    """notebooks/ablations.ipynb's settings; ConfigError before anything runs if an input is missing."""
    for sweep_dir in sweep_dirs:
        if not (sweep_dir / "sweep.json").is_file():
            what = "no such directory" if not sweep_dir.is_dir() else "no sweep.json in it"
            raise ConfigError(f"--sweep {sweep_dir}: {what} (a directory written by `python -m trainer sweep`)")
    env = {"SWEEP_DIRS": ",".join(str(d.resolve()) for d in sweep_dirs)}
    if baseline is not None:
        known = list(dict.fromkeys(v for d in sweep_dirs for v in sweep_variants(d)))
        if baseline not in known:
            raise ConfigError(f"--baseline {baseline!r} is in none of the sweeps; they hold: {', '.join(known)}")
        env["BASELINE"] = baseline
    return env


def collapse_env(healthy: Path, collapsed: Path, search: list[Path] = ()) -> dict[str, str]:
    """notebooks/loss_scale_collapse.ipynb's settings; ConfigError if a run directory is missing."""
    for flag, run_dir in (("--healthy", healthy), ("--collapsed", collapsed), *(("--search", d) for d in search)):
        if not (run_dir / "metrics.jsonl").is_file():
            what = "no such directory" if not run_dir.is_dir() else "no metrics.jsonl in it"
            raise ConfigError(f"{flag} {run_dir}: {what} (a run directory written by `python -m trainer train`)")
    return {"HEALTHY_RUN": str(healthy.resolve()), "COLLAPSED_RUN": str(collapsed.resolve()),
            "SEARCH_RUNS": ",".join(str(d.resolve()) for d in search)}


def execute(name: str, env: dict[str, str], timeout: float = 600):
    """Run notebooks/<name>.ipynb top to bottom in a fresh kernel with `env` added to ours."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    try:
        # the kernel warns on stderr that its local TCP sockets are unencrypted: noise for a report
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       extra_arguments=["--IPKernelApp.log_level=ERROR"]).execute(
            cwd=str(Path.cwd()), env={**os.environ, **env})
    except CellExecutionError as err:
        raise NotebookFailed(f"{name}.ipynb failed: {err.ename}: {err.evalue}") from None
    return notebook


def render(notebook, name: str) -> dict[str, bytes]:
    """The executed notebook as Markdown without its code (a report, the notebook holds the code):
    {relative path: bytes}, <name>.md and its figures under <name>_files/."""
    from nbconvert import MarkdownExporter

    body, resources = MarkdownExporter(exclude_input=True).from_notebook_node(
        notebook, resources={"output_files_dir": f"{name}_files", "unique_key": name})
    return {f"{name}.md": body.encode(), **resources["outputs"]}


def report(out_dir: Path, sweep_dirs: list[Path] = (), baseline: Optional[str] = None,
           healthy: Optional[Path] = None, collapsed: Optional[Path] = None, search: list[Path] = ()) -> list[Path]:
    """Validate every input, execute every notebook, then write: a failure writes nothing."""
    jobs = {}
    if sweep_dirs:
        jobs["ablations"] = ablations_env(list(sweep_dirs), baseline)
    elif baseline is not None:
        raise ConfigError("--baseline needs --sweep")
    if (healthy is None) != (collapsed is None):
        raise ConfigError("--healthy and --collapsed go together: the notebook compares the two runs")
    if search and healthy is None:
        raise ConfigError("--search needs --healthy and --collapsed: its runs are a section of their report")
    if healthy is not None:
        jobs["loss_scale_collapse"] = collapse_env(healthy, collapsed, list(search))
    if not jobs:
        raise ConfigError("nothing to report: give --sweep DIR..., or --healthy RUN --collapsed RUN, or both")
    with tempfile.TemporaryDirectory() as figures:  # the notebooks' own PNG copies; the report keeps its own
        rendered = {name: render(execute(name, {**env, "FIGURE_DIR": figures}), name) for name, env in jobs.items()}
    written = []
    for name, files in rendered.items():
        shutil.rmtree(out_dir / f"{name}_files", ignore_errors=True)  # no stale figures from an earlier report
        for relative, data in files.items():
            path = out_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
    return written
