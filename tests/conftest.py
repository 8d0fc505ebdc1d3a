import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
