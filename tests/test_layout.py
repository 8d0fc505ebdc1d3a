"""The package's shape: no import loops (the training core never imports the tools built on it), and
a run leaves the process as it found it (its signal handlers restored)."""
import ast
import signal
from pathlib import Path

from conftest import TINY

PACKAGE = Path(__file__).resolve().parent.parent / "trainer"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The trainer modules a file imports, at any depth of the file (lazy imports count too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            for alias in node.names:  # `from . import log` imports the module trainer.log
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_itself_through_others():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    visiting, done = [], set()

    def visit(name):
        assert name not in visiting, f"import loop: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        if name in done:
            return
        visiting.append(name)
        for target in graph[name]:
            visit(target)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_the_training_core_does_not_import_the_tools():
    core = [name for name in MODULES if not name.startswith("trainer.tools") and name != "trainer.cli"]
    for name in core:
        assert not any(t.startswith("trainer.tools") for t in imports_of(MODULES[name])), name


def test_a_run_restores_the_signal_handlers_it_found(tmp_path):
    from trainer.config import load_config
    from trainer.loop import fit

    def ours(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    interrupt = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `cmd &`
    try:
        cfg = load_config("demo", [*TINY, "train.max_steps=1", "train.eval_every_epochs=10", "wandb.mode=disabled"])
        assert fit(cfg, tmp_path / "run", resume=None)["status"] == "completed"
        assert signal.getsignal(signal.SIGTERM) is ours and signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
