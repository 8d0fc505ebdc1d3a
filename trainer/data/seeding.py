"""Augmentation random numbers as a pure function of (run seed, epoch, sample): the same numbers
on a replay or after a resume, whatever the worker."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded(seed: int):
    """Run a block with torch, numpy and python RNGs seeded, then restore them.

    Augmentation random numbers then depend on (run seed, epoch, sample) only:
    they differ across epochs, workers and ranks, and a resumed run redraws
    exactly the numbers the uninterrupted run drew."""
    if torch.utils.data.get_worker_info() is not None:
        # a DataLoader worker: nothing else draws from its generators, so skip the save and restore
        # (numpy's get_state/set_state alone cost ~0.1 ms, a third of a small image's whole load)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also reseed (and fork_rng not restore) the
        # GPU's, so dropout on the GPU would follow the data order when num_workers=0
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
