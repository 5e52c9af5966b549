"""Refresh the vendored front-end files from the npm registry (a maintainer's tool; the
service never reaches the network). Usage:

    python app/web/vendor/refresh.py            # the version pinned in uplot/VERSION
    python app/web/vendor/refresh.py 1.6.33     # another version

Downloads https://registry.npmjs.org/uplot/-/uplot-<version>.tgz, checks it against
the registry's published sha512 (`dist.integrity`), and keeps only what the page
loads (the ES module and the stylesheet) with the licence, and the version in VERSION.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
HERE = Path(__file__).resolve().parent
# package -> {file in the package tarball: name kept here}
PACKAGES = {
    "uplot": {
        "package/dist/uPlot.esm.js": "uPlot.esm.js",
        "package/dist/uPlot.min.css": "uPlot.min.css",
        "package/LICENSE": "LICENSE",
    }
}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def refresh(package: str, version: str | None) -> str:
    folder = HERE / package
    version = version or (folder / "VERSION").read_text().strip()
    meta = json.loads(fetch(f"{REGISTRY}/{package}/{version}"))
    tarball = fetch(meta["dist"]["tarball"])
    algorithm, _, expected = meta["dist"]["integrity"].partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if digest != expected:
        raise SystemExit(f"{package}@{version}: the tarball does not match its integrity hash")
    folder.mkdir(exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member, name in PACKAGES[package].items():
            handle = archive.extractfile(member)
            if handle is None:
                raise SystemExit(f"{package}@{version}: {member} missing from the tarball")
            (folder / name).write_bytes(handle.read())
    (folder / "VERSION").write_text(version + "\n")
    return version


if __name__ == "__main__":
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name in PACKAGES:
        print(name, refresh(name, wanted))
