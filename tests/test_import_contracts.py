"""The folder tree states the plan; this test holds the code to it.

- `worker/engine/` is a plain library: no web, queue, database or HTTP code, and
  nothing from `app/` or from the worker process modules.
- `worker/` never imports `app/`.
- `app/` imports the engine and the shared settings (`worker.settings`), never the
  worker process (`worker.celery_app`, `task`, `reporting`, `uploader`, `client`); the one
  exception is `app/cli/service.py` (the `worker` command), which starts that process.
- `torchyard/`, the client users import, stands alone: nothing from `app/` or `worker/`
  (not even the engine) and none of the service's or the engine's libraries, so it can
  be installed light.

Every import statement counts, also the lazy ones inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENGINE_FORBIDDEN = (
    "app",
    "celery",
    "kombu",
    "httpx",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "redis",
    "worker.celery_app",
    "worker.task",
    "worker.reporting",
    "worker.uploader",
    "worker.client",
    "worker.settings",
)
WORKER_PROCESS = (
    "worker.celery_app",
    "worker.task",
    "worker.reporting",
    "worker.uploader",
    "worker.client",
)
CLIENT_FORBIDDEN = (
    "app",
    "worker",
    "torch",
    "numpy",
    "celery",
    "kombu",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "redis",
)
# The `torchyard worker` command starts the worker process: it is the launcher.
APP_MAY_LAUNCH_WORKER = frozenset({"app/cli/service.py"})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, name))
            # `from worker import task` imports the module worker.task
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(
    folder: str, forbidden: tuple[str, ...], allowed_files: frozenset[str] = frozenset(), root=ROOT
) -> list[str]:
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in allowed_files:
            continue
        for line, name in imports_of(path, root):
            if matches(name, forbidden):
                out.append(f"{rel}:{line} imports {name}")
    return out


def test_engine_imports_no_web_queue_database_or_process_code():
    assert violations("worker/engine", ENGINE_FORBIDDEN) == []


def test_worker_never_imports_app():
    assert violations("worker", ("app",)) == []


def test_app_imports_the_engine_but_not_the_worker_process():
    assert violations("app", WORKER_PROCESS, APP_MAY_LAUNCH_WORKER) == []


def test_the_client_package_imports_nothing_of_the_service_or_the_engine():
    assert violations("torchyard", CLIENT_FORBIDDEN) == []


def test_importing_the_client_loads_no_service_engine_or_torch_module():
    """What the walker cannot see: a dependency of ours pulling one of them in."""
    probe = (
        "import sys, torchyard, torchyard.aio; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'app', 'worker', 'torch', "
        "'numpy', 'fastapi', 'sqlalchemy', 'celery'}))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]"


def test_the_cli_starts_without_torch():
    """`torchyard submit` and the other service commands answer in well under a second:
    torch (seconds to import) loads only in the commands that run the engine."""
    probe = "import sys, app.cli; print('torch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "False"


def test_the_worker_parent_runs_without_torch():
    """The worker process (`torchyard worker`: Celery, the claim, the uploads) imports no
    torch: each worker starts seconds sooner and ~200 MB lighter. Its training child
    imports torch when it trains."""
    probe = (
        "import sys, app.cli.service, worker.celery_app, worker.task, worker.gpus; "
        "print('torch' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize(
    "source, forbidden, expected",
    [
        ("import celery\n", ("celery",), True),
        ("from celery.app import Celery\n", ("celery",), True),
        ("def f():\n    from app.db import x\n", ("app",), True),
        ("from worker import task\n", ("worker.task",), True),
        ("from .. import client\n", ("worker.client",), True),
        ("import celeryish\n", ("celery",), False),
        ("from worker.engine import spec\n", ("worker.task",), False),
    ],
)
def test_the_walker_sees_every_kind_of_import(tmp_path, source, forbidden, expected):
    """The contract tests could not fail if the walker missed a form of import."""
    folder = tmp_path / "worker" / "engine"
    folder.mkdir(parents=True)
    path = folder / "probe.py"
    path.write_text(source)
    found = violations("worker/engine", forbidden, root=tmp_path)
    assert bool(found) is expected, found
