"""`python -m trainer report`: both notebooks execute headless (nbclient, a real kernel) on runs made
here, and come out as Markdown with their tables and PNG figures beside them."""
import json
import statistics

import pytest
import yaml

from conftest import TINY, run_cli
from trainer.config import load_config

FAST = [*TINY, "wandb.mode=disabled"]
# two notes rows x two seeds on the embedded digits, a few steps each: about 7 s a run
SWEEP = ["sweep", "--recipe", "notes_b0", "--variants", "notes/1,notes/3", "--seeds", "2", "--sweep-dir", "sweep",
         "data.source=digits", "data.num_workers=0", "engine.precision=fp32", "train.max_steps=6",
         "train.eval_every_epochs=0.05", *FAST]
HEALTHY = ["train", "--recipe", "demo", "--run-dir", "healthy", "engine.precision=fp16", "engine.allow_cpu_fp16=true",
           "train.max_steps=8", "train.log_every_steps=1", *FAST]
COLLAPSED = ["train", "--recipe", "demo", "--variant", "fp16-rmsprop-stress", "--run-dir", "collapsed",
             "train.log_every_steps=1", *FAST]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The runs, made once, and the report on them in out/."""
    root = tmp_path_factory.mktemp("report")
    for args, code in ((SWEEP, 0), (HEALTHY, 0), (COLLAPSED, 1)):  # a collapsed run exits 1
        result = run_cli(*args, cwd=root)
        assert result.returncode == code, result.stderr[-2000:]
    result = run_cli("report", "--sweep", "sweep", "--healthy", "healthy", "--collapsed", "collapsed",
                     "--out", "out", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of the Markdown tables, by their first cell."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def top1_of(root, variant):
    return [json.loads((root / "sweep" / f"{variant}-seed{seed}" / "summary.json").read_text())["top1"]
            for seed in (0, 1)]


def test_ablations_report_has_the_notes_table_with_seed_statistics_and_deltas(report):
    text = (report / "out" / "ablations.md").read_text()
    rows = table_rows(text)
    header = rows["#"]
    assert header[:2] == ["change", "runs"] and header[-1] == "notes (ImageNet)"
    row1, row3 = dict(zip(header, rows["1"])), dict(zip(header, rows["3"]))
    base, three = top1_of(report, "notes-1"), top1_of(report, "notes-3")
    assert row1["top-1"] == f"{statistics.mean(base):.2f} ± {statistics.stdev(base):.2f}"
    assert row1["Δ top-1"] == "baseline" and row1["notes (ImageNet)"] == "69.02/89.11"
    delta = statistics.mean(three) - statistics.mean(base)
    within_noise = abs(delta) < max(statistics.stdev(base), statistics.stdev(three))
    assert row3["Δ top-1"] == f"{delta:+.2f}" + (" ≈" if within_noise else "")
    assert row3["runs"] == "2 completed" and "label smoothing" in row3["change"]
    # the setup is read from the runs' config.yaml, not typed in
    assert "digits" in text and "not ImageNet numbers" in text and "test_efficientnet" in text
    assert "![png](ablations_files/val_top1.png)" in text
    assert (report / "out" / "ablations_files" / "val_top1.png").stat().st_size > 0
    assert "```" not in text  # a report: the code stays in the notebook


def test_collapse_report_compares_the_runs_and_shows_the_diagnosis(report):
    text = (report / "out" / "loss_scale_collapse.md").read_text()
    rows = table_rows(text)
    assert rows["status"] == ["completed", "collapsed"]
    assert rows["precision, ZeRO stage"] == ["fp16, 0", "fp16, 0"]
    assert rows["loss scale, first → last logged"][1].endswith("→ 1")  # down to DeepSpeed's minimum
    assert "### Run collapsed at step" in text  # the trainer's diagnosis.md, headings shifted
    assert "optim.name=rmsproptf" in text and "loss.smoothing_impl=log_softmax" in text
    for name in ("loss_scale", "loss", "grad_norm"):
        assert f"![png](loss_scale_collapse_files/{name}.png)" in text
        assert (report / "out" / "loss_scale_collapse_files" / f"{name}.png").stat().st_size > 0


def test_a_missing_run_directory_is_a_one_line_error_and_writes_nothing(report):
    result = run_cli("report", "--healthy", "healthy", "--collapsed", "nowhere", "--out", "out2", cwd=report)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --collapsed nowhere") and result.stderr.count("\n") == 1
    assert not (report / "out2").exists()


def fake_run(run_dir, variant, seed, precision, status, top1):
    """A run directory as the trainer leaves it (config.yaml, summary.json, metrics.jsonl), without training."""
    config = load_config("notes_b0", [f"seed={seed}", f"engine.precision={precision}", "data.source=digits"],
                         variant=variant).to_dict()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "top1": top1, "top5": top1, "ema_top1": top1,
                                                      "ema_top5": top1, "epochs": 1.0}))
    evals = [{"step": step, "epoch": step / 10, "top1": top1 or 10.0, "ema_top1": top1 or 10.0, "val_images": 70}
             for step in (5, 10)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evals))


def test_ablations_pools_sweeps_labels_precision_and_marks_shared_runs(tmp_path):
    """An fp32 sweep and an fp16 one of row 13: two rows, labelled by precision; row 26 shares row 13's runs;
    a collapsed seed leaves the mean to the other; a run not finished yet is counted, not shown."""
    manifests = {"fp32": [("notes/1", 0, 90.0), ("notes/1", 1, 92.0), ("notes/13", 0, 95.0), ("notes/13", 1, 96.0)],
                 "fp16": [("notes/13", 0, None), ("notes/13", 1, 80.0)]}
    for precision, runs in manifests.items():
        entries = []
        for variant, seed, top1 in runs:
            name = f"{variant.replace('/', '-')}-seed{seed}"
            fake_run(tmp_path / precision / name, variant, seed, precision, "collapsed" if top1 is None else "completed",
                     top1)
            entries.append({"variant": variant, "seed": seed, "run_dir": name, "same_as": None})
        if precision == "fp32":
            entries += [{"variant": "notes/26", "seed": s, "run_dir": f"notes-13-seed{s}", "same_as": f"notes-13-seed{s}"}
                        for s in (0, 1)]
            entries.append({"variant": "notes/14", "seed": 0, "run_dir": "notes-14-seed0", "same_as": None})
        (tmp_path / precision / "sweep.json").write_text(json.dumps({"recipe": "notes_b0", "group": precision,
                                                                      "runs": entries}))
    result = run_cli("report", "--sweep", "fp32", "fp16", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "ablations.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    assert [(r["#"], r["precision"]) for r in rows] == [("1", "fp32"), ("13", "fp32"), ("13", "fp16"), ("26", "fp32")]
    base, row13, row13_fp16, row26 = rows
    assert base["top-1"] == "91.00 ± 1.41" and base["Δ top-1"] == "baseline"
    assert row13["top-1"] == "95.50 ± 0.71" and row13["Δ top-1"] == "+4.50"  # beyond both rows' spread: no mark
    assert row13_fp16["runs"] == "1 collapsed, 1 completed" and row13_fp16["top-1"] == "80.00"
    assert row13_fp16["Δ top-1"] == "-11.00"
    assert "same settings as `notes/13`" in row26["change"] and row26["top-1"] == row13["top-1"]
    assert "8 with a result, of 9 listed" in text
