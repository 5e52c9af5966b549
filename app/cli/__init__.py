"""The `torchyard` command: the typer app and its command families.

local.py    schema, validate, train, export: the engine on this machine
service.py  serve, worker: the service's processes (the one module that starts the worker)
remote.py   upload, submit, jobs, status, cancel, metrics, download, rm, projects, tag, note:
            the REST API's client (through `torchyard.Client`)
admin.py    token create, admin gc-datasets: straight to the service's database
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from app.cli import admin, local, remote, service

app = typer.Typer(
    help="torchyard: train PyTorch models from JSON job specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration order is the order `--help` lists them in.
command: Callable[..., Any]
for command in (local.schema, local.validate, local.train, local.export, service.serve):
    app.command()(command)
app.command("worker")(service.worker_command)
for command in (
    remote.upload,
    remote.submit,
    remote.jobs,
    remote.status,
    remote.cancel,
    remote.metrics,
    remote.download,
    remote.rm,
    remote.projects,
    remote.tag,
    remote.note,
):
    app.command()(command)
app.add_typer(admin.token_app, name="token")
app.add_typer(admin.admin_app, name="admin")


def main() -> None:
    app()
