"""The ImageFolder scan, without torchvision's symlink hazards.

torchvision's ImageFolder walks each class folder with os.walk(followlinks=True). A symlink loop
in the tree (cat/again -> ..) is walked until the OS refuses the path length: every image comes
back many times, images of other classes come back labeled cat, and since the train/val split is
drawn over the sample list, the same file lands in both splits. A link to another class's folder
(cat/more -> ../dog) gives dog's images a second label.

`scan_image_folder` keeps torchvision's rules (a class is a folder at the root, sorted by name;
a sample is a file with one of IMG_EXTENSIONS, case-insensitive, in any subfolder; samples ordered
as torchvision orders them, so an ordinary tree gives the same list and the same split) and
follows symlinked files and folders only to what the scan has not reached otherwise:

- every real folder of the tree is walked first; a link is followed after that, only if its target
  (by real path) is outside the tree and not reached yet, and does not contain the folder holding
  the link (a loop). A link into the tree is skipped: its target is already there, with its own
  label. Links to elsewhere (a class folder on another disk, a subset made of links) are followed.
- a dangling link with an image extension is kept as a sample: reading it fails, and the loader
  reports it once, replaces it and counts it as a corrupt image (the sample list, and so the
  split, stays the same whether or not its target comes back).
- each link not followed is named in a warning on stderr (at most MAX_WARNINGS lines, then a count).
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from typing import NamedTuple

from torchvision.datasets.folder import IMG_EXTENSIONS

MAX_WARNINGS = 10
ALREADY_THERE = "its target is already in the scan (a file gets one label, and lands in one split)"


class FolderScan(NamedTuple):
    """What ImageFolder gives as .samples and .classes; unpacks as (samples, classes)."""
    samples: list[tuple[str, int]]
    classes: list[str]


def _within(path: str, folder: str) -> bool:
    """path is folder or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Scan:
    def __init__(self, directory: str):
        self.directory = directory
        self.real_root = os.path.realpath(directory)
        self.walked: set[str] = set()  # real paths of the folders walked
        self.reached: set[str] = set()  # real paths of the files reached outside the tree
        self.found: list[tuple[int, str, str]] = []  # (label, folder path, file name)
        self.links: list[tuple[str, int, str]] = []  # (link path, label, real path of its folder)
        self.skipped: list[str] = []

    def walk(self, path: str, real: str, label: int) -> None:
        """One real folder and the real folders below it; links are queued, not followed."""
        if real in self.walked:
            return
        self.walked.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as err:  # os.walk, in torchvision, leaves an unreadable folder out silently
            self.skipped.append(f"cannot list {self._shown(path)} ({err.strerror}): its images are left out")
            return
        outside = not _within(real, self.real_root)
        for entry in entries:
            if entry.is_symlink():
                self.links.append((entry.path, label, real))
            elif entry.is_dir(follow_symlinks=False):
                self.walk(entry.path, os.path.join(real, entry.name), label)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if outside:  # inside the tree each real file is met once; outside, a link may have met it
                    file_real = os.path.join(real, entry.name)
                    if file_real in self.reached:
                        self._skip(entry.path, file_real, ALREADY_THERE)
                        continue
                    self.reached.add(file_real)
                self.found.append((label, path, entry.name))

    def follow(self, link: str, label: int, holder: str) -> None:
        target = os.path.realpath(link)
        image_name = os.path.basename(link).lower().endswith(IMG_EXTENSIONS)
        try:
            target_is_dir = stat.S_ISDIR(os.stat(link).st_mode)
        except OSError as err:
            if err.errno != errno.ENOENT:  # ELOOP: links that lead to each other
                self._skip(link, target, f"it cannot be resolved ({err.strerror})")
            elif image_name and target not in self.reached:  # dangling: kept, counted as corrupt when read
                self.reached.add(target)
                self.found.append((label, os.path.dirname(link), os.path.basename(link)))
            return
        if target_is_dir:
            if _within(holder, target) or _within(self.real_root, target):
                self._skip(link, target, "a loop (it leads back to a folder that holds it)")
            elif _within(target, self.real_root) or target in self.walked:
                self._skip(link, target, ALREADY_THERE)
            else:
                self.walk(link, target, label)
            return
        if not image_name:
            return
        # a file of the tree in a class folder, with an image extension: the walk has found it
        found_by_walk = (_within(target, self.real_root) and os.path.dirname(target) != self.real_root
                         and target.lower().endswith(IMG_EXTENSIONS))
        if found_by_walk or target in self.reached:
            self._skip(link, target, ALREADY_THERE)
            return
        self.reached.add(target)
        self.found.append((label, os.path.dirname(link), os.path.basename(link)))

    def follow_links(self) -> None:
        # links in the order they are met, breadth first; links met in a followed folder join the end
        done = 0
        while done < len(self.links):
            link, label, holder = self.links[done]
            done += 1
            self.follow(link, label, holder)

    def _shown(self, path: str) -> str:
        return os.path.relpath(path, self.directory)

    def _skip(self, link: str, target: str, why: str) -> None:
        self.skipped.append(f"not following {self._shown(link)} -> {target}: {why}")

    def warn(self) -> None:
        for line in self.skipped[:MAX_WARNINGS]:
            print(f"warning: data folder {self.directory}: {line}", file=sys.stderr, flush=True)
        if len(self.skipped) > MAX_WARNINGS:
            print(f"warning: data folder {self.directory}: {len(self.skipped) - MAX_WARNINGS} more links "
                  f"not followed", file=sys.stderr, flush=True)


def scan_image_folder(root) -> FolderScan:
    """(samples [(path, label)], classes) of an ImageFolder tree, as torchvision's ImageFolder
    gives them for a tree without symlinks; each real file at most once (see the module's doc).
    Raises FileNotFoundError with torchvision's messages: no class folder, a class without images."""
    directory = os.path.expanduser(os.fspath(root))
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    scan = _Scan(directory)
    for label, name in enumerate(classes):
        path = os.path.join(directory, name)
        if os.path.islink(path):
            scan.links.append((path, label, scan.real_root))
        else:
            scan.walk(path, os.path.join(scan.real_root, name), label)
    scan.follow_links()
    scan.warn()
    scan.found.sort()  # torchvision's order: class, then folder path, then file name
    empty = set(classes) - {classes[label] for label, _, _ in scan.found}
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
    return FolderScan([(os.path.join(folder, name), label) for label, folder, name in scan.found], classes)
