"""Where `serve` sends what a person does not need to watch: `$HOME/logs/serve.log`.

The terminal keeps the URL, the token, the state folder, "worker ready" and errors
that stop serve; uvicorn's info and access lines, the app's own logs, Python
warnings and the workers' output (Celery's banner and warnings) go to the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fresh_log(home: Path) -> Path:
    """The log file of this run; the previous run's stays beside it as serve.log.1.

    One file a run, not one that grows forever, and still the last run's story to
    read after a restart. Workers write to it through inherited descriptors, so it
    is rotated here at start, never while they hold it.
    """
    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "serve.log"
    if path.exists():
        path.replace(folder / "serve.log.1")
    path.touch()
    return path


def uvicorn_log_config(path: Path) -> dict[str, Any]:
    """uvicorn's logging config (logging.config.dictConfig) that writes to `path`.

    Only ERROR and above of uvicorn's own logger also reach the terminal: a port in
    use or an app that fails to start stops serve, and the person must see why.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "file": {"format": FILE_FORMAT},
            "terminal": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s %(message)s",
            },
        },
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "file"},
            "terminal": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "terminal",
                "level": "ERROR",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["file", "terminal"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["file"], "level": "INFO", "propagate": False},
        },
        # The app's loggers (reconciler, dispatch, unhandled errors) and warnings.warn.
        "root": {"handlers": ["file"], "level": "INFO"},
    }


def verbose_logging() -> None:
    """`serve --verbose`: the app's info logs in the terminal too, beside uvicorn's."""
    logging.basicConfig(level=logging.INFO, format=FILE_FORMAT)
