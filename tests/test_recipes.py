"""The recipes under trainer/recipes/: the TF reference recipe for B0..B7, the notes' rows as
variants of notes_b0, cifar10 on the shared JPEGs; each loads, says what it claims, and runs."""
import json
import re

import pytest
import yaml

from conftest import REPO, TINY, read_jsonl, run_cli
from trainer.config import available_recipes, load_config, read_recipe
from trainer.optim import LRSchedule, peak_lr

NOTES = REPO.parent / "shared" / "NOTES.md"
CIFAR = REPO.parent / "shared" / "data" / "cifar10-train"
# the README's run from the repository root names the folder so
CIFAR_DEFAULT_PATH = "../shared/data/cifar10-train"

# TF EfficientNet: (resolution, dropout, parameters at 1000 classes from the paper, in millions)
TF_MODELS = {0: (224, 0.2, 5.3), 1: (240, 0.2, 7.8), 2: (260, 0.3, 9.2), 3: (300, 0.3, 12),
             4: (380, 0.4, 19), 5: (456, 0.4, 30), 6: (528, 0.5, 43), 7: (600, 0.5, 66)}
NOTES_ROWS = range(1, 43)


def all_variants():
    return [(name, variant) for name in available_recipes()
            for variant in [None, *(read_recipe(name).get("variants") or {})]]


def settings(cfg) -> dict:
    """The config without the fields that name it."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("recipe", "variant", "name")}


def notes_variants() -> dict:
    return read_recipe("notes_b0")["variants"]


def notes_table() -> dict[int, tuple[str, str]]:
    """NOTES.md's numbered rows: number -> (change, result), as written."""
    rows = {}
    for line in NOTES.read_text().splitlines():
        match = re.fullmatch(r"\|\s*(\d+)\s*\|(.*)\|(.*)\|\s*", line)
        if match:
            rows[int(match[1])] = (match[2].strip(), match[3].strip())
    return rows


# -- every recipe and variant loads

def test_the_issue_recipes_exist():
    names = set(available_recipes())
    assert {"tf_efficientnet", "notes_b0", "cifar10", *(f"tf_efficientnet_b{n}" for n in range(8))} <= names


@pytest.mark.parametrize("recipe, variant", all_variants())
def test_every_recipe_and_variant_loads(recipe, variant, tmp_path):
    cfg = load_config(recipe, [f"data.path={tmp_path}"], variant=variant)
    assert cfg.recipe == recipe and cfg.variant == variant
    meta = (read_recipe(recipe).get("variants") or {}).get(variant, {}).get("meta", {})
    if variant is not None:
        assert meta.get("description"), f"{recipe} --variant {variant} has no meta.description"


def test_a_recipe_without_data_path_loads_and_the_data_build_names_the_missing_path():
    from trainer.config import ConfigError
    from trainer.data.loaders import build_loaders

    cfg = load_config("tf_efficientnet_b0")  # a recipe names no machine's folder
    assert cfg.data.source == "imagefolder" and cfg.data.path is None
    with pytest.raises(ConfigError, match="data.path") as err:
        build_loaders(cfg.data, micro_batch=8, seed=0, rank=0, world_size=1)
    assert "\n" not in str(err.value)


def test_cli_refuses_a_missing_data_path_in_one_line_before_writing(tmp_path):
    result = run_cli("train", "--recipe", "tf_efficientnet_b0", "--run-dir", "run", "wandb.mode=disabled",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    # the error is one line, the last (torch may warn about CUDA on import before it)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.path" in errors[0] and result.stderr.strip().endswith(errors[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


# -- the TF reference recipe

@pytest.mark.parametrize("n", range(8))
def test_tf_recipe_settings(n):
    size, dropout, _ = TF_MODELS[n]
    cfg = load_config(f"tf_efficientnet_b{n}")
    assert cfg.model.name == f"tf_efficientnet_b{n}"
    assert cfg.data.image_size == size and cfg.model.drop_rate == dropout and cfg.model.drop_path_rate == 0.2
    assert (cfg.model.bn_momentum, cfg.model.bn_eps, cfg.model.init) == (0.99, 1e-3, "tf")
    o = cfg.optim
    assert (o.name, o.alpha, o.momentum, o.eps) == ("rmsproptf", 0.9, 0.9, 1e-3)
    assert (o.lr, o.lr_base_batch, o.lr_scaling) == (0.016, 256, "linear")
    assert (o.weight_decay, o.wd_form, o.wd_params) == (1e-5, "l2_loss", "no_bn")
    s = cfg.schedule
    assert (s.name, s.decay_rate, s.decay_epochs) == ("tf_staircase", 0.97, 2.4)
    assert (s.warmup_epochs, s.warmup_form, s.warmup_start_lr, s.warmup_in_decay_clock) == (5, "linear", 0.0, True)
    assert cfg.loss.label_smoothing == 0.1 and cfg.mixup.mode == "off"
    assert cfg.train.epochs == 350 and cfg.ema.decay == 0.9999
    d = cfg.data
    assert d.source == "imagefolder" and d.auto_augment == "v0" and d.aa_order == "after_crop"
    assert int(d.image_size * d.aa_translate_pct) == 250  # TF translates by up to 250 px at every size
    assert d.interpolation == "bicubic" and d.crop_pct == 0.875 and d.hflip == 0.5
    assert (d.crop_scale, d.crop_ratio) == ((0.08, 1.0), pytest.approx((3 / 4, 4 / 3)))


@pytest.mark.parametrize("n", range(1, 8))
def test_tf_eval_crop_padding_variant_is_tf_crop_fraction(n):
    size = TF_MODELS[n][0]
    cfg = load_config(f"tf_efficientnet_b{n}", variant="eval_crop_padding32")
    assert cfg.data.crop_pct == pytest.approx(size / (size + 32), abs=1e-4)
    assert settings(cfg) | {"data": None} == settings(load_config(f"tf_efficientnet_b{n}")) | {"data": None}


@pytest.mark.parametrize("world, micro", [(1, 128), (8, 128), (8, 512), (32, 128)])
def test_tf_lr_is_0016_per_256_of_the_global_batch(world, micro):
    cfg = load_config("tf_efficientnet_b0", [f"train.micro_batch={micro}", "train.grad_accum=2"])
    global_batch = world * micro * cfg.train.grad_accum
    assert peak_lr(cfg.optim, global_batch) == pytest.approx(0.016 * global_batch / 256)
    assert peak_lr(cfg.optim, 4096) == pytest.approx(0.256)  # the paper's batch and lr


def test_tf_schedule_is_tf_staircase_from_step_0():
    """Through the real schedule, against TF's formula: warmup to the peak over 5 epochs, then
    peak x 0.97^floor(step / (2.4 epochs)) with the clock counting from step 0."""
    cfg = load_config("tf_efficientnet_b3")
    spe, peak = 100, 0.256
    lr = LRSchedule(cfg.schedule, peak, spe, total_steps=350 * spe)
    for step in [0, 1, 250, 499, 500, 719, 720, 959, 960, 34_999]:
        tf = peak * step / 500 if step < 500 else peak * 0.97 ** (step // 240)
        assert lr(step) == pytest.approx(tf, rel=1e-12, abs=1e-15), step


def test_tf_models_are_the_named_size():
    """A B1 config builds a B1, not a B0: parameter counts at 1000 classes against the paper, all distinct."""
    from trainer.model import build_model

    counts = {}
    for n, (size, dropout, paper_m) in TF_MODELS.items():
        cfg = load_config(f"tf_efficientnet_b{n}")
        model = build_model(cfg.model, num_classes=1000)
        counts[n] = sum(p.numel() for p in model.parameters())
        assert counts[n] / 1e6 == pytest.approx(paper_m, rel=0.05), (n, counts[n])
        assert model.drop_rate == dropout
        bn = next(m for m in model.modules() if m.__class__.__name__.startswith("BatchNorm"))
        assert bn.momentum == pytest.approx(0.01) and bn.eps == 1e-3
        del model
    assert len(set(counts.values())) == 8
    assert counts[0] < counts[1] < counts[2] < counts[3] < counts[4] < counts[5] < counts[6] < counts[7]


def test_tf_base_recipe_is_b0():
    assert settings(load_config("tf_efficientnet")) == settings(load_config("tf_efficientnet_b0"))


# -- the notes

def test_every_notes_row_has_a_variant_with_its_reference():
    covered = {}
    for name, body in notes_variants().items():
        meta = body["meta"]
        if name.startswith("notes/"):
            rows = meta.get("rows", [meta.get("row")])
            assert all(isinstance(r, int) for r in rows), name
            assert meta.get("description") and meta.get("reference"), name
            for row in rows:
                covered[row] = (name, meta["reference"])
        else:
            assert name.startswith("plan/"), name
            assert meta.get("description") and meta.get("reference") == "(planned)", name
    assert set(NOTES_ROWS) <= covered.keys(), sorted(set(NOTES_ROWS) - covered.keys())
    assert covered[13] == ("notes/13", "71.03/90.13")


def test_notes_references_are_the_notes_results_verbatim():
    if not NOTES.is_file():
        pytest.skip(f"{NOTES} is absent: the notes' own table cannot be compared")
    table = notes_table()
    assert set(table) == set(NOTES_ROWS)
    for name, body in notes_variants().items():
        meta = body["meta"]
        for row in meta.get("rows", [meta["row"]] if "row" in meta else []):
            assert meta["reference"] == table[row][1], (name, row)


def test_notes_variants_that_claim_the_same_settings_have_them():
    """'the settings of notes/N' and 'the same settings as notes/N' in a description are checked."""
    checked = 0
    for name, body in notes_variants().items():
        for other in re.findall(r"(?:the settings of|the same settings as) (notes/\d+)", body["meta"]["description"]):
            assert settings(load_config("notes_b0", variant=name)) == \
                   settings(load_config("notes_b0", variant=other)), (name, other)
            checked += 1
    assert checked >= 5


def test_every_notes_row_but_the_first_modifies_an_earlier_row():
    """meta.modifies, the row notebooks/ablations.ipynb compares each row with: the row before within a part,
    row 13 at the start of parts 2 and 3, else a row whose settings this one changes in one respect."""
    modifies = {body["meta"]["row"]: body["meta"].get("modifies")
                for name, body in notes_variants().items() if name.startswith("notes/")}
    assert modifies[1] is None
    for row in NOTES_ROWS[1:]:
        assert isinstance(modifies[row], int) and 1 <= modifies[row] < row, (row, modifies[row])
    assert modifies[14] == modifies[26] == 13
    assert (modifies[23], modifies[24], modifies[37]) == (19, 23, 34)


def test_notes_row_1_is_the_recipe_and_rows_accumulate():
    base = load_config("notes_b0")
    assert settings(load_config("notes_b0", variant="notes/1")) == settings(base)
    assert (base.model.name, base.optim.name, base.optim.nesterov, base.schedule.name) == \
           ("efficientnet_b0", "sgd", False, "constant")
    assert base.loss.label_smoothing == 0 and base.optim.weight_decay == 0 and base.data.crop_pct == 1.0
    assert base.train.micro_batch * 8 == 256 and base.model.init == "torch"

    def cfg(row):
        return load_config("notes_b0", variant=f"notes/{row}")
    assert cfg(2).schedule.name == "cosine" and cfg(2).loss.label_smoothing == 0
    assert cfg(3).schedule.name == "cosine" and cfg(3).loss.label_smoothing == 0.1
    assert cfg(4).data.crop_pct == 0.875 and cfg(3).data.crop_pct == 1.0
    assert (cfg(5).engine.precision, cfg(5).loss.smoothing_impl) == ("fp16", "log_of_softmax_unstable")
    assert (cfg(6).engine.precision, cfg(6).loss.smoothing_impl) == ("fp16", "log_softmax")
    assert cfg(7).engine.precision == "fp32"
    assert [cfg(r).train.micro_batch * 8 for r in (9, 10, 11, 12)] == [256, 1024, 2048, 1024]
    r13 = cfg(13)
    assert (r13.optim.name, r13.optim.weight_decay, r13.optim.wd_form, r13.optim.wd_params) == \
           ("sgd", 2e-5, "coupled", "all")
    assert (r13.engine.precision, r13.loss.label_smoothing, r13.data.crop_pct) == ("fp16", 0.1, 0.875)
    assert cfg(14).optim.name == "rmsprop" and cfg(37).optim.name == "rmsproptf"
    assert cfg(15).train.epochs == 200 and cfg(17).train.epochs == 100
    assert cfg(17).schedule.warmup_form == "exponential" and cfg(18).schedule.warmup_form == "linear"
    assert [cfg(r).model.init for r in (18, 19, 20, 21)] == ["torch", "tf", "torch", "tf"]
    assert [cfg(r).optim.wd_form for r in (21, 22, 25, 30, 31)] == \
           ["coupled", "l2_loss", "decoupled", "l2_loss", "coupled"]
    assert [cfg(r).engine.precision for r in (22, 23, 24, 25)] == ["fp32", "fp16", "fp32", "fp16"]
    assert settings(cfg(26)) == settings(r13)  # part 3 starts again from row 13
    assert cfg(28).loss.label_smoothing == 0 and cfg(29).loss.label_smoothing == 0.1
    assert cfg(32).optim.wd_params == "no_bn_no_bias" and cfg(33).train.micro_batch == 2 * cfg(32).train.micro_batch
    assert cfg(34).model.act_after_projection and not cfg(33).model.act_after_projection
    assert cfg(38).train.epochs == 450
    assert (cfg(39).data.color_jitter, cfg(39).data.random_erasing) == (0.4, 0.2)
    assert not cfg(39).schedule.warmup_in_decay_clock and cfg(40).schedule.warmup_in_decay_clock
    r41 = cfg(41)
    peak = peak_lr(r41.optim, r41.train.micro_batch * 8)
    assert r41.schedule.warmup_start_lr * peak == pytest.approx(1e-6)  # row 41: warmup from lr 1e-6
    assert cfg(42).model.zero_init_last_bn and not cfg(41).model.zero_init_last_bn


def test_plan_variants_change_what_they_name():
    def cfg(name):
        return load_config("notes_b0", variant=f"plan/{name}")
    assert cfg("sqrt-lr").optim.lr_scaling == "sqrt"
    assert cfg("mixup-tf").mixup.mode == "tf"
    assert (cfg("aa-before-crop").data.auto_augment, cfg("aa-before-crop").data.aa_order) == ("v0", "before_crop")
    assert (cfg("cosine").schedule.name, cfg("cosine").schedule.min_lr) == ("cosine", 0.0)
    assert {cfg(f"wd-{p}").optim.wd_params for p in ("all", "no-conv-bias", "weights-only", "no-bn")} == \
           {"all", "no_conv_bias", "weights_only", "no_bn"}
    assert {cfg(f"init-{i}").model.init for i in ("tf", "timm", "torch")} == {"tf", "timm", "torch"}
    assert (cfg("tf-l2").optim.wd_form, cfg("tf-l2").optim.wd_params) == ("l2_loss", "no_bn")
    assert cfg("sgd").optim.name == "sgd" and not cfg("sgd").optim.nesterov


def test_recipes_command_lists_notes_variants_with_rows_and_references():
    result = run_cli("recipes", cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, body in notes_variants().items():
        meta = body["meta"]
        line = next((l for l in lines if l.strip().startswith(f"--variant {name}:")), None)
        assert line is not None, name
        assert meta["description"] in line and meta["reference"] in line, line
        for row in meta.get("rows", [meta["row"]] if "row" in meta else []):
            assert f"row {row}" in line or f"rows {row}" in line or f", {row}" in line, line
    assert any(l.startswith("tf_efficientnet_b7:") for l in lines) and any(l.startswith("cifar10:") for l in lines)


# -- cifar10

def test_cifar10_recipe_settings():
    cfg = load_config("cifar10")
    d = cfg.data
    assert (d.source, d.path, d.image_size, d.hflip) == ("imagefolder", CIFAR_DEFAULT_PATH, 32, 0.5)
    assert d.crop_scale[0] >= 0.35 and 0 < d.val_fraction < 0.5
    assert cfg.model.name == "efficientnet_b0" and cfg.loss.label_smoothing == 0.1
    assert cfg.train.epochs <= 30


# -- short CPU runs through the CLI

SHORT = [*TINY, "train.max_steps=3", "train.log_every_steps=1", "train.eval_every_epochs=100",
         "data.num_workers=0", "wandb.mode=disabled"]


def check_run(result, run_dir, steps=3):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps, summary
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    return summary


def test_cifar10_short_run_on_the_shared_jpegs(tmp_path):
    if not CIFAR.is_dir():
        pytest.skip(f"the CIFAR-10 JPEG tree {CIFAR} is absent (it is ../shared/data/cifar10-train from the repo root)")
    # from the repository root, as a user runs it: the recipe's relative data.path must find the tree
    run = tmp_path / "run"
    result = run_cli("train", "--recipe", "cifar10", "--run-dir", run, *SHORT, "data.val_fraction=0.004",
                     cwd=REPO)
    summary = check_run(result, run)
    assert summary["final"]["val_images"] == 200  # 0.4% of the 50,000 JPEGs, each once
    assert "cifar10" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("variant, extra", [
    ("notes/3", []),                                     # SGD, cosine, label smoothing, fp32
    ("notes/22", []),                                    # torch RMSprop, TF init, linear warmup, L2 loss term
    ("notes/42", ["engine.allow_cpu_fp16=true"]),          # RMSpropTF fp16, CJ + RE, warmup from 1e-6, zero-init
    ("plan/aa-before-crop", ["engine.allow_cpu_fp16=true"]),  # TF's AutoAugment v0 (its 0-bit Posterize included)
])
def test_notes_variant_short_run_on_digits(variant, extra, tmp_path):
    result = run_cli("train", "--recipe", "notes_b0", "--variant", variant, "--run-dir", "run", *SHORT,
                     "data.source=digits", *extra, cwd=tmp_path)
    check_run(result, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["variant"] == variant
    expected = load_config("notes_b0", [*SHORT, "data.source=digits", *extra], variant=variant).to_dict()
    assert saved == expected


@pytest.mark.slow
@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_and_variant_trains_its_first_steps(recipe, tmp_path):
    """Loading is not enough: TF's AutoAugment loaded and then crashed in the first batches. Every
    recipe and variant trains 2 steps and evaluates (test model, digits), through `sweep`."""
    variants = ["", "all"] if read_recipe(recipe).get("variants") else [""]
    for spec in variants:
        result = run_cli("sweep", "--recipe", recipe, *(["--variants", spec] if spec else []), "--sweep-dir",
                         "sweep", *TINY, "data.source=digits", "train.max_steps=2", "engine.allow_cpu_fp16=true",
                         "data.num_workers=0", "wandb.mode=disabled", cwd=tmp_path, timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = [json.loads(path.read_text()) for path in (tmp_path / "sweep").glob("*/summary.json")]
    assert summaries and all(s["status"] in ("completed", "collapsed") for s in summaries)
