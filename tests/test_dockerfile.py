"""The image installs the same package as a checkout.

No Docker engine runs here, so the image is not built; what can drift without one is
the build context. The Dockerfile COPYs folders one by one: a package added to
pyproject.toml but not COPYed (as `torchyard/`, the client, once was) leaves the
image without it. This builds a wheel from exactly what the Dockerfile COPYs and
one from the checkout, and compares their files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copied() -> list[tuple[str, str]]:
    """The Dockerfile's COPY instructions as (source, destination) pairs."""
    pairs = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            assert not any(w.startswith("--") for w in words), f"unexpected COPY flags: {line}"
            *sources, dest = words[1:]
            pairs += [(source, dest) for source in sources]
    return pairs


def wheel_files(source: Path, out: Path) -> set[str]:
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("torchyard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        # the record and metadata name the wheel's own build; the package is the rest
        return {n for n in archive.namelist() if ".dist-info/" not in n}


def test_the_images_build_context_builds_the_checkouts_package(tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for source, dest in copied():
        target = context / dest if not dest.endswith("/") else context / dest / source
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    checkout = tmp_path / "checkout"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    for name in filter(None, tracked.split("\0")):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, checkout / name)
    image = wheel_files(context, tmp_path / "image-wheel")
    repo = wheel_files(checkout, tmp_path / "repo-wheel")
    assert repo - image == set(), "the image's package lacks these files of the checkout's"
    assert image == repo
    assert {"app/main.py", "worker/celery_app.py", "torchyard/client.py"} <= image
