"""Issue 18.4: a damaged LMDB pack. A truncated file is refused at open in one line (it used to kill
the process with SIGBUS, exit 135); a record whose header is damaged is reported, replaced and
counted like a corrupt JPEG, and the run completes. Real packs, damaged on disk."""
import json

import lmdb
import pytest

from conftest import image_tree, run_cli
from test_reliability import QUIET, snapshot
from trainer.config import ConfigError, DataConfig
from trainer.data.sources import split_indices
from trainer.data.lmdb_source import HEADER, LmdbImages, pack, sample_key

TRAIN = ["train", "--recipe", "demo", "--run-dir", "run", "data.source=lmdb", "model.name=test_efficientnet",
         "data.image_size=16", "train.micro_batch=4", "train.log_every_steps=1", *QUIET]


@pytest.fixture
def packed(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=8, size=(24, 20))  # 24 images: 19 train, 5 val
    pack(tree, tmp_path / "set.lmdb", progress=False)
    return tmp_path / "set.lmdb"


def test_a_truncated_pack_is_one_line_exit_2_not_a_sigbus(packed, tmp_path):
    half = tmp_path / "half.lmdb"
    data = packed.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    result = run_cli(*TRAIN, "data.path=half.lmdb", "train.max_steps=2", cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])  # 135 (SIGBUS) before
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"error: data: half.lmdb is damaged: the file has {len(data) // 2} bytes where its LMDB "
                         f"header says {len(data)} are in use (truncated, or a copy cut short); pack the tree "
                         f"again with `python -m trainer pack`")
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before  # no run directory


def test_a_pack_missing_records_is_refused_at_open(packed):
    env = lmdb.open(str(packed), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(sample_key(3))
    env.close()
    with pytest.raises(ConfigError, match=r"is damaged: its index says 24 images, the file holds 23 records"):
        LmdbImages(str(packed))


def test_a_record_with_a_damaged_header_is_counted_and_the_run_completes(packed, tmp_path):
    source = LmdbImages(str(packed))
    data_cfg = DataConfig()
    victim = split_indices(len(source), data_cfg.val_fraction, data_cfg.split_seed)[1][0]  # every eval reads it
    label, rel, image = source.record(victim)
    data = bytearray(packed.read_bytes())
    header = HEADER.pack(label, len(rel.encode())) + rel.encode()
    # every copy: LMDB's copy-on-write pages may keep a stale one besides the live one
    places = [at for at in range(len(data)) if data.startswith(header, at)]
    assert places
    for at in places:
        data[at:at + HEADER.size] = b"\xff" * HEADER.size  # label -1, a path longer than the record
    packed.write_bytes(bytes(data))  # same size: LMDB's own checks pass

    result = run_cli(*TRAIN, f"data.path={packed}", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # tqdm's bars share stderr: the report is the end of its line
    reports = [line[line.index("warning:"):] for line in result.stderr.splitlines() if "warning: skipping" in line]
    assert reports == [f"warning: skipping corrupt or unreadable image {packed}:record {victim}: record header "
                       f"damaged (label -1, path length 4294967295, record of {len(header) + len(image)} bytes) "
                       f"(replaced by the next sample; reported once)"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["corrupt_images"] == 1
