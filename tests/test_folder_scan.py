"""Issue 18.5: the ImageFolder scan follows no symlink loop and never gives one file two labels or
two splits; on a tree without links it is torchvision's scan, sample for sample. Real trees."""
import os

import pytest
from torchvision.datasets import ImageFolder

from conftest import image_tree, run_cli
from trainer.data.sources import FolderImages, split_indices
from trainer.data.decode import CorruptImage
from trainer.data.folder_scan import scan_image_folder
from trainer.data.lmdb_source import LmdbImages


def real_labels(samples) -> dict:
    """real path -> the labels it was given."""
    labels = {}
    for path, label in samples:
        labels.setdefault(os.path.realpath(path), []).append(label)
    return labels


def test_an_ordinary_tree_scans_as_torchvision_does(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=7, classes=("cat", "dog", "fox", "a b", "Z"))
    (tree / "cat" / "sub" / "deeper").mkdir()
    (tree / "cat" / "sub" / "deeper" / "x.JPG").write_bytes(b"")  # any case of an image extension
    (tree / "cat" / "sub-x").mkdir()  # '-' sorts before '/': torchvision orders by the folder's path string
    (tree / "cat" / "sub-x" / "y.png").write_bytes(b"")
    (tree / "dog" / "notes.txt").write_text("not an image")
    (tree / "README.txt").write_text("not a class")
    elsewhere = image_tree(tmp_path / "elsewhere", per_class=2, classes=("owl",))
    (tree / "owl").symlink_to(elsewhere / "owl")  # a class folder on another disk: followed, as torchvision does
    (tree / "emu").mkdir()  # a class made of links to files elsewhere
    others = image_tree(tmp_path / "others", per_class=2, classes=("emu",))
    (tree / "emu" / "a.jpg").symlink_to(others / "emu" / "1.jpg")
    (tree / "emu" / "b.jpg").symlink_to(others / "emu" / "sub" / "0.jpg")
    reference = ImageFolder(str(tree))
    scan = scan_image_folder(tree)
    assert scan.classes == reference.classes
    assert scan.samples == reference.samples


def test_loops_links_to_another_class_and_dangling_links(tmp_path, capfd):
    tree = image_tree(tmp_path / "tree", per_class=6)  # cat, dog, fox: 6 images each
    ordinary = scan_image_folder(tree)
    (tree / "cat" / "loop").symlink_to(tree)  # back to the root: torchvision walks it 40 levels deep
    (tree / "fox" / "dogs").symlink_to(tree / "dog")  # another class's folder
    (tree / "fox" / "also.jpg").symlink_to(tree / "dog" / "1.jpg")  # another class's file
    (tree / "dog" / "gone.jpg").symlink_to(tree / "dog" / "deleted.jpg")  # dangling

    # what torchvision's scan makes of it: files many times, with other classes' labels
    reference = real_labels(ImageFolder(str(tree)).samples)
    assert max(len(given) for given in reference.values()) > 10
    assert any(len(set(given)) > 1 for given in reference.values())

    # a second loop, back to its own class folder: torchvision's walk now branches at every level (2^40 paths)
    (tree / "cat" / "sub" / "back").symlink_to(tree / "cat")
    capfd.readouterr()

    samples, classes = scan_image_folder(tree)
    assert classes == ["cat", "dog", "fox"]
    labels = real_labels(samples)
    assert all(len(given) == 1 for given in labels.values())  # each file once, so in one split
    assert sorted(samples) == sorted([*ordinary.samples, (str(tree / "dog" / "gone.jpg"), 1)])
    for path, label in samples:  # each file with the label of the class folder it lies in
        assert os.path.relpath(os.path.realpath(path), os.path.realpath(tree)).split(os.sep)[0] == classes[label] \
            or path.endswith("gone.jpg")
    train, val = split_indices(len(samples), 0.2, seed=0)
    assert not {os.path.realpath(samples[i][0]) for i in train} & {os.path.realpath(samples[i][0]) for i in val}

    warnings = capfd.readouterr().err.strip().splitlines()
    real = os.path.realpath(tree)
    assert warnings == [
        f"warning: data folder {tree}: not following cat/loop -> {real}: a loop (it leads back to a folder "
        f"that holds it)",
        f"warning: data folder {tree}: not following cat/sub/back -> {real}/cat: a loop (it leads back to a "
        f"folder that holds it)",
        f"warning: data folder {tree}: not following fox/also.jpg -> {real}/dog/1.jpg: its target is already in "
        f"the scan (a file gets one label, and lands in one split)",
        f"warning: data folder {tree}: not following fox/dogs -> {real}/dog: its target is already in the scan "
        f"(a file gets one label, and lands in one split)"]


def test_a_dangling_link_is_kept_and_read_as_a_corrupt_image(tmp_path):
    tree = image_tree(tmp_path / "tree", per_class=2, classes=("a", "b"))
    (tree / "b" / "gone.jpg").symlink_to(tree / "b" / "deleted.jpg")
    samples, _ = scan_image_folder(tree)
    source = FolderImages(str(tree))  # today's scan lists it too: the same samples, the same split
    assert samples == source.samples
    index = samples.index((str(tree / "b" / "gone.jpg"), 1))
    with pytest.raises(CorruptImage, match="No such file or directory"):  # reported, replaced, counted
        source.encoded(index)


def test_a_class_folder_that_is_a_link_to_another_class_is_refused(tmp_path, capfd):
    tree = image_tree(tmp_path / "tree", per_class=2, classes=("cat", "dog"))
    (tree / "kitty").symlink_to(tree / "cat")
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes kitty"):
        scan_image_folder(tree)
    assert f"not following kitty -> {os.path.realpath(tree)}/cat: its target is already in the scan" in \
        capfd.readouterr().err


def test_pack_takes_the_same_scan(tmp_path):
    """A loop is not followed by pack either; a dangling link is refused by pack before it writes
    (tests/test_bad_input.py), where a training run counts it as a corrupt image."""
    tree = image_tree(tmp_path / "tree", per_class=2, classes=("a", "b"))
    (tree / "a" / "loop").symlink_to(tree)
    result = run_cli("pack", tree, tmp_path / "set.lmdb", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packed 4 images of 2 classes" in result.stdout
    assert f"warning: data folder {tree}: not following a/loop -> " in result.stderr

    samples, classes = scan_image_folder(tree)
    pack = LmdbImages(str(tmp_path / "set.lmdb"))
    assert pack.classes == classes and pack.labels.tolist() == [label for _, label in samples]
    assert [pack.name(i) for i in range(len(pack))] == \
        [f"{tmp_path / 'set.lmdb'}:{os.path.relpath(path, tree)}" for path, _ in samples]
