"""`python -m trainer report`: both notebooks execute headless (nbclient, a real kernel) on runs made
here, and come out as Markdown with their tables and PNG figures beside them."""
import json
import statistics

import pytest
import yaml
from scipy import stats

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
                     "--search", "healthy", "collapsed", "--out", "out", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of the Markdown tables, by their first cell."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every Markdown table, in order: its rows as dicts keyed by the header's cells."""
    found, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|---"):  # the header's separator
            continue
        if line.startswith("| "):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif block:
            found.append([dict(zip(block[0], cells)) for cells in block[1:]])
            block = []
    return found


def top1_of(root, variant):
    return [json.loads((root / "sweep" / f"{variant}-seed{seed}" / "summary.json").read_text())["top1"]
            for seed in (0, 1)]


def test_ablations_report_has_the_notes_table_with_seed_statistics_and_deltas(report):
    text = (report / "out" / "ablations.md").read_text()
    table, compared, summary = tables(text)
    header = list(table[0])
    # a sweep without `labels` in sweep.json (not a --proxy one): no label column, and the report says so
    assert header[:3] == ["#", "change", "runs"] and header[-1] == "notes (ImageNet)" and "label" not in header
    assert "**No labels:** no `labels` in the `sweep.json` of sweep" in text
    row1, row3 = (next(r for r in table if r["#"] == n) for n in ("1", "3"))
    base, three = top1_of(report, "notes-1"), top1_of(report, "notes-3")
    assert row1["top-1"] == f"{statistics.mean(base):.2f} ± {statistics.stdev(base):.2f}"
    assert row1["Δ top-1"] == "baseline" and row1["notes (ImageNet)"] == "69.02/89.11"
    delta = statistics.mean(three) - statistics.mean(base)
    within_noise = abs(delta) < max(statistics.stdev(base), statistics.stdev(three))
    assert row3["Δ top-1"] == f"{delta:+.2f}" + (" ≈" if within_noise else "")
    assert row3["runs"] == "2 completed" and "label smoothing" in row3["change"]
    # row 3 modifies row 2, which this sweep does not have: the notes' direction only
    assert list(compared[0]) == ["#", "vs row", "Δ vs that row", "test", "ours", "notes", "agrees"]
    assert compared == [{"#": "3", "vs row": "2 (not swept)", "Δ vs that row": "", "test": "", "ours": "",
                         "notes": "68.89 → 68.54: down", "agrees": "—"}]
    assert {r["#"] for r in summary} == {"5", "14", "15", "16", "17", "18", "23", "19", "20", "21", "22", "24", "37"}
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
    for name in ("loss_scale", "loss", "grad_norm", "search"):
        assert f"![png](loss_scale_collapse_files/{name}.png)" in text
        assert (report / "out" / "loss_scale_collapse_files" / f"{name}.png").stat().st_size > 0


def test_the_search_section_says_how_far_each_run_got(report):
    rows = table_rows((report / "out" / "loss_scale_collapse.md").read_text())
    healthy, collapsed = rows["healthy"], rows["collapsed"]  # the search table: one row per run, by directory
    assert healthy[3:5] == ["completed", "8 of 8"] and collapsed[3] == "collapsed"
    assert collapsed[0] == "rmsprop" and float(collapsed[1]) == 4.0  # the stress variant's torch RMSprop at lr 4
    assert float(collapsed[6]) == 1  # the lowest loss scale: DeepSpeed's minimum
    first, largest = (float(norm) for norm in collapsed[9].split(" → "))
    assert largest > first  # the weights grew before the collapse
    summary = json.loads((report / "healthy" / "summary.json").read_text())["final"]
    assert healthy[10] == f"{summary['top1']:.1f} ({summary['ema_top1']:.1f})" and collapsed[10] == "—"


def test_a_missing_run_directory_is_a_one_line_error_and_writes_nothing(report):
    result = run_cli("report", "--healthy", "healthy", "--collapsed", "nowhere", "--out", "out2", cwd=report)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --collapsed nowhere") and result.stderr.count("\n") == 1
    assert not (report / "out2").exists()


def fake_run(run_dir, variant, seed, precision, status, top1, ema_top1=None, losses=(2.0,)):
    """A run directory as the trainer leaves it (config.yaml, summary.json, metrics.jsonl), without training:
    `losses` are its logged training losses (the trainer writes a non-finite one as a string, "inf")."""
    config = load_config("notes_b0", [f"seed={seed}", f"engine.precision={precision}", "data.source=digits"],
                         variant=variant).to_dict()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    ema_top1 = top1 if ema_top1 is None else ema_top1
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "top1": top1, "top5": top1, "ema_top1": ema_top1,
                                                      "ema_top5": top1, "epochs": 1.0}))
    training = [{"step": step, "epoch": step / 10, "loss": loss, "lr": 0.1} for step, loss in enumerate(losses, 1)]
    evals = [{"step": step, "epoch": step / 10, "top1": top1 or 10.0, "ema_top1": ema_top1 or 10.0, "val_images": 70}
             for step in (5, 10)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in training + evals))


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
    rows = tables(text)[0]
    assert [(r["#"], r["precision"]) for r in rows] == [("1", "fp32"), ("13", "fp32"), ("13", "fp16"), ("26", "fp32")]
    base, row13, row13_fp16, row26 = rows
    assert base["top-1"] == "91.00 ± 1.41" and base["Δ top-1"] == "baseline"
    assert row13["top-1"] == "95.50 ± 0.71" and row13["Δ top-1"] == "+4.50"  # beyond both rows' spread: no mark
    assert row13_fp16["runs"] == "1 collapsed, 1 completed" and row13_fp16["top-1"] == "80.00"
    assert row13_fp16["Δ top-1"] == "-11.00"
    assert "same settings as `notes/13`" in row26["change"] and row26["top-1"] == row13["top-1"]
    assert "8 with a result, of 9 listed" in text


def test_ablations_labels_rows_and_compares_each_with_the_row_it_modifies(tmp_path):
    """A --proxy sweep's sweep.json carries label thresholds: each row gets a label by the rule, and each is
    compared with the row it modifies (the notes' direction, ours, whether they agree)."""
    seeds = {  # variant: per seed (status, top1, ema_top1, training losses)
        "notes/2": [("completed", 90.0, 91.0, (2.0,)), ("completed", 89.0, 90.0, (2.0,))],  # the higher: EMA
        "notes/3": [("completed", 80.0, 70.0, (2.0,)), ("completed", 80.5, 70.0, (2.0,))],
        "notes/4": [("completed", 60.0, 60.0, (2.0,)), ("completed", 62.0, 62.0, (2.0,))],
        # collapsed (a pre-collapse top-1 of 45), and a completed run that logged an inf loss: both failed
        "notes/5": [("collapsed", 45.0, 10.0, (2.0, "inf")), ("completed", 50.0, 50.0, (2.0, "inf", 1.5))],
        "notes/6": [("completed", 20.0, 20.0, (2.0,)), ("completed", 15.0, 15.0, (2.0,))],  # learned + in between
        "notes/7": [("completed", 11.0, 11.5, (2.0,)), ("completed", 9.0, 9.0, (2.0,))],  # below 12: failed
        "notes/10": [("completed", 50.0, 50.0, (2.0,)), ("completed", 70.0, 70.0, (2.0,))],
        "notes/12": [("completed", 55.0, 55.0, (2.0,)), ("completed", 66.0, 66.0, (2.0,))],  # modifies 10
        # stopped before their last step (to be continued): their last evaluation is no result, no label
        "notes/13": [("interrupted", 40.0, 40.0, (2.0,)), ("interrupted", 41.0, 41.0, (2.0,))],
    }
    entries = []
    for variant, runs in seeds.items():
        for seed, (status, top1, ema_top1, losses) in enumerate(runs):
            name = f"{variant.replace('/', '-')}-seed{seed}"
            fake_run(tmp_path / "sweep" / name, variant, seed, "fp32", status, top1, ema_top1, losses)
            entries.append({"variant": variant, "seed": seed, "run_dir": name, "same_as": None})
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({
        "recipe": "notes_b0", "group": "sweep", "proxy": "cifar10",
        "labels": {"fail_below": 12.0, "learned_from": 18.0}, "runs": entries}))
    result = run_cli("report", "--sweep", "sweep", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "ablations.md").read_text()
    table, compared, summary = tables(text)
    assert "`fail_below` 12, `learned_from` 18" in text and "not informative at this length" in text
    assert "little power" in text and "16 with a result, of 18 listed" in text
    labels = {r["#"]: r["label"] for r in table}
    assert labels == {"2": "learned", "3": "learned", "4": "learned", "5": "failed",
                      "6": "not informative at this length", "7": "failed", "10": "learned", "12": "learned"}
    assert list(compared[0]) == ["#", "vs row", "labels", "Δ vs that row", "test", "ours", "notes", "agrees"]
    rows = {r["#"]: r for r in compared}
    assert {n: r["vs row"] for n, r in rows.items()} == {"2": "1 (not swept)", "3": "2", "4": "3", "5": "4", "6": "5",
                                                          "7": "6", "10": "9 (not swept)", "12": "10"}

    def welch(a, b):
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
        return f"p = {p:.2g}", p

    # row 3 vs 2 on the higher of model and EMA: 80.0, 80.5 against 91.0, 90.0
    test, p = welch([80.0, 80.5], [91.0, 90.0])
    assert p < 0.05 and rows["3"]["test"] == test and rows["3"]["Δ vs that row"] == "-10.25"
    assert rows["3"]["ours"] == "down" and rows["3"]["notes"] == "68.89 → 68.54: down" and rows["3"]["agrees"] == "yes"
    # learned -> failed in the labels: the labels give the direction (a collapsed seed has no final top-1
    # to test); the notes: "loss became inf", failed
    assert rows["5"]["labels"] == "learned → failed" and rows["5"]["test"] == "labels: learned → failed"
    assert rows["5"]["ours"] == "down" and rows["5"]["notes"] == "68.14 → failed: down" and rows["5"]["agrees"] == "yes"
    # a row that is not informative is compared with nothing
    assert rows["6"]["labels"] == "failed → not informative" and rows["6"]["agrees"] == "—"
    assert rows["6"]["notes"] == "failed → 67.86: up"
    # "(not recorded)": no notes direction
    assert rows["7"]["notes"] == "67.86 → not recorded: —" and rows["7"]["agrees"] == "—"
    # the notes go up 2.89 points; two overlapping seeds show nothing: ≈, which disagrees
    test, p = welch([55.0, 66.0], [50.0, 70.0])
    assert p >= 0.05 and rows["12"]["test"] == test and rows["12"]["ours"] == "≈"
    assert rows["12"]["notes"] == "67.86 → 70.75: up" and rows["12"]["agrees"] == "no"
    assert rows["2"]["agrees"] == "—" and rows["2"]["Δ vs that row"] == ""  # row 1 not swept
    # the notes' failures and their rows that train, with the labels here
    listed = {r["#"]: r for r in summary}
    assert listed["5"]["label here"] == "failed" and listed["5"]["top-1 per seed"] == "45.0, 50.0"
    assert listed["19"]["top-1 per seed"] == "not swept" and listed["19"]["notes"] == "trains in the notes"
