"""Browser tests of the dashboard: Playwright for Python driving Debian's Chromium,
headless, against `torchyard serve` (the API, the page and a real worker) in a home
of its own (SQLite, the filesystem broker).

Without Playwright or Chromium the tests skip and say why; under CI=true that is a
failure instead (.ci/run installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service_e2e import ROOT, Service, serve_embedded
from torchyard import Client

SCREENSHOTS = os.environ.get("TORCHYARD_SCREENSHOTS")  # a folder: save a picture of each page


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the browser tests need {reason} in CI")
    pytest.skip(f"no browser: {reason}")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        _unavailable("Debian's chromium (apt-get install chromium)")
    return path  # type: ignore[return-value]


# A module's: Playwright's sync API keeps an event loop running in this thread while it
# lives, and asyncio tests later in the same test process (pytest-xdist) could not run.
@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (pip install playwright)")
    # Playwright cannot download its own browsers here: it drives the system's
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`torchyard serve` as the README's quickstart runs it, in a home of its own."""
    with serve_embedded(tmp_path_factory.mktemp("dashboard")) as service:
        yield service


def new_user_token(service: Service, name: str) -> str:
    """A second user, made as an admin does (`torchyard token create`)."""
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "create", name],
        env=service.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[Client]:
    client = service.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits(api: Client, examples_dir: Path) -> tuple[str, str]:
    train = api.datasets.upload(examples_dir / "data" / "digits_train.npz")
    val = api.datasets.upload(examples_dir / "data" / "digits_val.npz")
    return train["id"], val["id"]


def digits_spec(train: str, val: str, *, epochs: int, name: str = "digits") -> dict[str, Any]:
    spec = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    spec["name"] = name
    spec["data"].update(train=train, validation=val)
    spec["model"]["layers"] = [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ]
    spec["training"].update(epochs=epochs, scheduler=None, log_every_n_steps=1)
    spec["callbacks"] = {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}}
    return spec


@pytest.fixture
def page(browser: Any, service: Service) -> Iterator[Any]:
    context = browser.new_context(base_url=service.url, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    yield page
    context.close()
    # a script error, or an alert() (an injected script would raise one), fails the test
    assert errors == []


def sign_in(page: Any, token: str) -> None:
    page.goto("/")
    page.fill("#token", token)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#jobs")


def shoot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"dashboard-{name}.png"), full_page=True)


def wait_until(predicate: Callable[[], Any], timeout: float = 120, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def http(service: Service) -> httpx.Client:
    return httpx.Client(base_url=service.url)
