import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# A tiny timm EfficientNet keeps CLI runs to seconds; the code path is the same as B0.
GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TINY = ["model.name=test_efficientnet", "data.image_size=16", "train.micro_batch=32"]


def run_cli(*args, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # in-process DeepSpeed tests leave this process's group variables behind: a child must not join it
    for name in ("WANDB_MODE", "WANDB_API_KEY", *GROUP_VARIABLES):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def cli(tmp_path):
    def call(*args, **kwargs):
        return run_cli(*args, cwd=tmp_path, **kwargs)
    return call


# -- image trees on disk: real JPEG and PNG files

def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like picture: low-resolution noise upscaled (as CIFAR upscaled to ImageNet sizes)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
    return small.resize((width, height), Image.BICUBIC)


def image_tree(root, per_class=6, size=(40, 30), classes=("cat", "dog", "fox")):
    """Class folders of JPEGs and PNGs (and one image in a subfolder: ImageFolder walks them)."""
    for c, name in enumerate(classes):
        (root / name / "sub").mkdir(parents=True)
        for k in range(per_class):
            img = smooth_image(*size, seed=10 * c + k)
            if k % 3 == 2:
                img.save(root / name / f"{k}.png")
            else:
                img.save(root / name / ("sub" if k == 0 else "") / f"{k}.jpg", quality=90)
    return root


def corrupt_tree(root, each: int = 1):
    """16 good images in classes a and b, and `each` truncated JPEGs (in a) and text files named .jpg
    (in b); returns the tree and the bad files' paths."""
    tree = image_tree(root, per_class=8, size=(24, 20), classes=("a", "b"))
    whole = (tree / "a" / "1.jpg").read_bytes()
    bad = []
    for k in range(each):
        truncated, text = tree / "a" / f"truncated{k}.jpg", tree / "b" / f"notes{k}.jpg"
        truncated.write_bytes(whole[: len(whole) // 2])
        text.write_text("this is a text file, not a JPEG\n")
        bad += [str(truncated), str(text)]
    return tree, bad


def batch_plan(micro_batch: int, grad_accum: int = 1, world_size: int = 1):
    """A RunPlan for engine-level tests that need only the batch arithmetic (ten steps per epoch)."""
    from trainer.config import CheckpointConfig, TrainConfig
    from trainer.plan import RunPlan

    return RunPlan.build(TrainConfig(micro_batch=micro_batch, grad_accum=grad_accum), CheckpointConfig(), 0.0,
                         world_size, train_images=10 * micro_batch * grad_accum * world_size,
                         micro_batches_per_epoch=10 * grad_accum)

