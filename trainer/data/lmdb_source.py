"""An ImageFolder tree packed into one LMDB file, and the data source that reads it.

    python -m trainer pack /data/imagenet/train /data/imagenet-train.lmdb
    python -m trainer train --recipe tf_efficientnet_b0 data.source=lmdb data.path=/data/imagenet-train.lmdb

The file keeps each image's encoded bytes as they were (never re-encoded: same pixels as the tree),
its label and its path relative to the root, in ImageFolder's order, so sample i of the pack is
sample i of the tree and the train/val split is the same. One file instead of a million small ones:
a single open, and the page cache and readahead work on it.

Layout: key b"%010d" % i -> struct "<iI" (label, path length) + utf-8 path + bytes;
b"__labels__" -> int32 labels; b"__meta__" -> JSON (format, classes, count, source), written
last. The pack is written to DST.tmp-XXXXXX and renamed to DST only once complete: an
interrupted pack leaves at most a tmp file, and a file without __meta__ is refused as incomplete.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .decode import CorruptImage, EncodedImage, decoded_rgb
from .sources import ImageSource

FORMAT = "effnet-trainer-lmdb/1"
HEADER = struct.Struct("<iI")
META_KEY, LABELS_KEY = b"__meta__", b"__labels__"
COMMIT_EVERY = 1000  # records per write transaction


def sample_key(index: int) -> bytes:
    return b"%010d" % index


def pack(src: str | Path, dst: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Pack the ImageFolder tree `src` into the LMDB file `dst`; return its meta."""
    import lmdb
    from tqdm import tqdm

    from .folder_scan import scan_image_folder

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConfigError(f"pack: {src} is not a folder")
    if dst.exists() and not force:
        raise ConfigError(f"pack: {dst} exists; pass --force to replace it")
    if dst.is_dir():
        raise ConfigError(f"pack: {dst} is a folder; name the LMDB file to write")
    try:
        tree = scan_image_folder(src)  # the scan, order and class list every source shares
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"pack: {src}: {str(err).splitlines()[0]}") from None
    missing = [path for path, _ in tree.samples if not os.path.isfile(path) and not os.path.exists(path)]
    if missing:  # a dangling symlink (the scan lists it): refused before anything is written
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"pack: {missing[0]} is a link to nothing{more}")
    total_bytes = sum(os.path.getsize(path) for path, _ in tree.samples if os.path.isfile(path))
    # LMDB's map is address space, not disk: the file grows with what is written. Room for
    # page rounding of every value (one 4 KiB page at most each) and the B-tree.
    map_size = 2 * total_bytes + 8192 * len(tree.samples) + (64 << 20)

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{dst.name}.tmp-", dir=dst.parent)  # a fresh name, never an old tmp
    except OSError as err:  # a read-only filesystem, a path through a file, /proc
        reason = "a file, not a folder" if dst.parent.is_file() else err.strerror or err
        raise ConfigError(f"pack: cannot write in {dst.parent}: {reason}") from None
    os.close(fd)
    env = None
    try:
        env = lmdb.open(tmp, subdir=False, map_size=map_size, lock=False, readahead=False, meminit=False,
                        sync=False, metasync=False)
        txn = env.begin(write=True)
        for index, (path, label) in enumerate(tqdm(tree.samples, desc=f"pack {src.name}", unit="img",
                                                   disable=not progress, dynamic_ncols=True)):
            rel = os.path.relpath(path, src).encode()
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:  # unreadable (permissions, I/O): the tmp file is removed below
                raise ConfigError(f"pack: cannot read {path}: {err.strerror or err}") from None
            txn.put(sample_key(index), HEADER.pack(label, len(rel)) + rel + data)
            if (index + 1) % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        meta = {"format": FORMAT, "classes": tree.classes, "count": len(tree.samples), "source": str(src.resolve())}
        txn.put(LABELS_KEY, np.asarray([label for _, label in tree.samples], dtype="<i4").tobytes())
        txn.put(META_KEY, json.dumps(meta).encode())  # last: its presence marks a complete pack
        txn.commit()
        env.sync(True)
        env.close()
        env = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a pack is a file like any other
        os.replace(tmp, dst)  # atomic: DST is either absent (or the old one) or complete
    except BaseException:
        if env is not None:
            env.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


REPACK = "pack the tree again with `python -m trainer pack`"


def _check_file_size(env, path: Path) -> None:
    """The file must hold every page LMDB's meta page says is in use. LMDB maps more than the file
    and follows page numbers into the map: a page past the end of a truncated file is a SIGBUS on
    first touch, which kills the process (exit 135) with no message. info() and stat() read only
    the meta page, at the start of the file, so this check itself is safe."""
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = path.stat().st_size
    if size < used:
        raise ConfigError(f"data: {path} is damaged: the file has {size} bytes where its LMDB header says "
                          f"{used} are in use (truncated, or a copy cut short); {REPACK}")


def read_meta(path: str | Path) -> tuple[dict, np.ndarray]:
    """The pack's meta and labels; ConfigError for a missing, foreign, incomplete or damaged file."""
    import lmdb

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data: LMDB file {path} does not exist (write one with `python -m trainer pack ROOT {path}`)")
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
    except lmdb.Error as err:
        raise ConfigError(f"data: {path} is not an LMDB file ({str(err).splitlines()[0]})") from None
    try:
        _check_file_size(env, path)  # before any read of a data page
        entries = env.stat()["entries"]
        with env.begin() as txn:
            raw_meta, raw_labels = txn.get(META_KEY), txn.get(LABELS_KEY)
    except lmdb.Error as err:  # MDB_CORRUPTED, MDB_PAGE_NOTFOUND: a damaged B-tree
        raise ConfigError(f"data: {path} is damaged ({str(err).splitlines()[0]}); {REPACK}") from None
    finally:
        env.close()
    if raw_meta is None or raw_labels is None:
        raise ConfigError(f"data: {path} is not a complete pack (no index: an interrupted or foreign "
                          f"LMDB); {REPACK}")
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        raise ConfigError(f"data: {path} is damaged (its index does not parse); {REPACK}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"data: {path} has format {meta.get('format')!r}, want {FORMAT!r}")
    labels = np.frombuffer(raw_labels, dtype="<i4") if len(raw_labels) % 4 == 0 else None
    count = meta.get("count")
    # every image a record, plus the labels and the meta entries
    if entries != count + 2 or labels is None or len(labels) != count:
        raise ConfigError(f"data: {path} is damaged: its index says {count} images, the file holds "
                          f"{entries - 2} records and {len(raw_labels) // 4} labels; {REPACK}")
    if count and not (0 <= labels.min() and labels.max() < len(meta["classes"])):
        raise ConfigError(f"data: {path} is damaged: labels outside the {len(meta['classes'])} classes; {REPACK}")
    return meta, labels


class LmdbImages(ImageSource):
    """A pack written by `pack`: the same samples, order, labels and class list as its tree."""

    def __init__(self, path: str):
        self.path = str(path)
        meta, labels = read_meta(path)
        self.classes = meta["classes"]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._env = None  # opened in each process that reads (an LMDB handle must not cross a fork)
        self.init_corrupt_flags()

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_env": None}

    def record(self, index: int) -> tuple[int, str, bytes]:
        """(label, path in the tree, encoded bytes); CorruptImage for a record whose header does not
        read back (the loader replaces and counts it, as a JPEG that does not decode)."""
        if self._env is None:
            import lmdb

            self._env = lmdb.open(self.path, subdir=False, readonly=True, lock=False, readahead=False,
                                  meminit=False, max_readers=1024)
        with self._env.begin(buffers=False) as txn:
            value = txn.get(sample_key(index))
        if value is None or len(value) < HEADER.size:
            raise CorruptImage("record missing or shorter than its header")
        label, n = HEADER.unpack_from(value)
        start = HEADER.size + n
        # the label is also in the labels array: a header that disagrees with it is damaged
        if start > len(value) or label != int(self.labels[index]):
            raise CorruptImage(f"record header damaged (label {label}, path length {n}, "
                               f"record of {len(value)} bytes)")
        try:
            rel = value[HEADER.size:start].decode()
        except UnicodeDecodeError:
            raise CorruptImage("record header damaged (its path is not UTF-8)") from None
        return label, rel, value[start:]

    def name(self, index: int) -> str:
        try:
            return f"{self.path}:{self.record(index)[1]}"
        except CorruptImage:  # named for a report about that very record
            return f"{self.path}:record {index}"

    def encoded(self, index: int):
        label, rel, data = self.record(index)
        return EncodedImage(data, f"{self.path}:{rel}"), label

    def load(self, index: int):
        image, label = self.encoded(index)
        return decoded_rgb(image.data)[0], label
