"""Hostile and broken job specs: every one is a clear 4xx naming where and why, never a 500.

Each case is sent to both /jobs/validate and /jobs, and nothing may be queued.
The last test is the one failure that only shows when training starts: a model
whose weights cannot be allocated ends the run `failed` with a one-line reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import numpy as np

from tests.app.conftest import job_spec

ROUTES = ("/jobs/validate", "/jobs")
JSON = {"Content-Type": "application/json"}


def refused(client: httpx.Client, body: bytes | dict[str, Any], status: int = 422) -> list:
    """POST to both routes; both answer `status`; returns the detail (the same from both)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    details = []
    for route in ROUTES:
        response = client.post(route, content=content, headers=JSON)
        assert response.status_code == status, (route, response.status_code, response.text[:500])
        details.append(response.json()["detail"])
    assert details[0] == details[1]
    assert client.get("/jobs").json()["jobs"] == [], "a refused spec must not be queued"
    return details[0]


def issue_at(detail: list[dict[str, str]], path: str) -> str:
    """The message of the issue at `path` (every issue has exactly a path and a message)."""
    assert all(set(issue) == {"path", "message"} for issue in detail), detail
    messages = [issue["message"] for issue in detail if issue["path"] == path]
    assert messages, (path, detail)
    return messages[0]


def test_malformed_json_is_422_saying_what_is_wrong_and_where(user):
    assert (
        "malformed JSON: Expecting property name enclosed in double quotes at line 1 column 2"
        in (issue_at(refused(user, b"{not json"), ""))
    )
    assert "malformed JSON" in issue_at(refused(user, b'{"name": "x",\n  "data": }'), "")
    assert "line 2" in issue_at(refused(user, b'{"name": "x",\n  "data": }'), "")
    # bytes that are not UTF-8 at all
    assert "malformed JSON" in issue_at(refused(user, b"\xff\xfe\x00garbage"), "")
    # an integer past Python's int-conversion limit: was a 500 (ValueError) before
    message = issue_at(refused(user, b'{"seed": ' + b"9" * 5000 + b"}"), "")
    assert "malformed JSON" in message and "4300 digits" in message
    # NaN and Infinity are not JSON; where a number is checked, the check names them
    assert issue_at(refused(user, b'{"seed": NaN}'), "seed") == (
        "input should be a finite number, found nan"
    )


def test_a_document_that_is_not_an_object_is_422(user):
    for body, found in ((b"[]", "list"), (b"null", "NoneType"), (b'"spec"', "str"), (b"7", "int")):
        assert issue_at(refused(user, body), "") == f"a job spec is a JSON object, found {found}"


def test_ten_megabytes_of_json_is_413_naming_the_limit_before_it_is_read(user):
    body = b'{"name": "' + b"x" * 10_000_000 + b'"}'
    for route in ROUTES:
        response = user.post(route, content=body, headers=JSON)
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "request body of 10,000,012 bytes exceeds the limit of 1,048,576 bytes"
        )


def test_ten_megabytes_streamed_without_a_length_is_cut_off_at_the_limit(user):
    def chunks():
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 100_000
        yield b'"}'

    response = user.post("/jobs", content=chunks(), headers=JSON)
    assert response.status_code == 413
    # was Starlette's bare "Content Too Large"
    assert response.json()["detail"] == "request body exceeds the limit of 1,048,576 bytes"
    assert user.get("/jobs").json()["jobs"] == []


def test_ten_thousand_deep_nesting_is_422_not_a_recursion_crash(user, dataset):
    for body in (b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        assert issue_at(refused(user, body), "") == "JSON nested too deeply"
    # nesting just under the parser's limit, where a number belongs, goes deeper into the checks
    spec = json.dumps(job_spec(dataset["id"])).replace(
        '"out_features": 8', '"out_features": ' + "[" * 900 + "]" * 900
    )
    message = issue_at(refused(user, spec.encode()), "model.layers[0].out_features")
    assert message.startswith("expected an integer, found [[[")


def test_a_hundred_thousand_nodes_is_413_by_size_and_422_by_count(user, dataset, make_server):
    nodes = [
        {"name": f"n{i}", "type": "relu", "in": f"n{i - 1}" if i else "input"}
        for i in range(100_000)
    ]
    spec = job_spec(dataset["id"], model={"nodes": nodes, "outputs": "n99999"})
    detail = refused(user, spec, status=413)
    assert "exceeds the limit of 1,048,576 bytes" in detail
    # with the size limit raised, the node-count limit still holds, quickly
    roomy = make_server(max_spec_bytes=16 << 20)
    with roomy.new_user() as client:
        from tests.app.conftest import upload

        spec["data"]["train"] = upload(client)["id"]
        detail = refused(client, spec)
    # refused by the count alone, before any node was looked at (no per-node issues)
    assert [issue["path"] for issue in detail] == ["model.nodes"], detail[:3]
    assert "at most 10000" in issue_at(detail, "model.nodes")


def test_a_model_of_a_trillion_parameters_is_422_naming_the_limit(user, dataset):
    spec = job_spec(
        dataset["id"],
        model={
            "layers": [
                {"type": "linear", "out_features": 1_000_000},
                {"type": "linear", "out_features": 1_000_000},
                {"type": "linear", "out_features": 3},
            ]
        },
    )
    assert issue_at(refused(user, spec), "model") == (
        "1,000,009,000,003 parameters, more than the limit of 500,000,000"
    )


def test_a_cycle_is_422_naming_the_nodes_on_it(user, dataset):
    spec = job_spec(
        dataset["id"],
        data__inputs={"x": "x"},
        model={
            "nodes": [
                {"name": "a", "type": "linear", "out_features": 3, "in": ["x_in", "b"]},
                {"name": "b", "type": "linear", "out_features": 3, "in": "a"},
                {"name": "x_in", "type": "linear", "out_features": 3, "in": "x"},
            ],
            "outputs": "a",
        },
    )
    assert "cycle" in issue_at(refused(user, spec), "model.nodes")


def test_negative_sizes_are_422_at_their_path(user, dataset):
    cases = {
        "model.layers[0].out_features": job_spec(
            dataset["id"], model={"layers": [{"type": "linear", "out_features": -5}]}
        ),
        "model.layers[0].kernel_size": job_spec(
            dataset["id"],
            model={"layers": [{"type": "conv1d", "out_channels": 2, "kernel_size": -3}]},
        ),
        "data.batch_size": job_spec(dataset["id"], data__batch_size=-1),
        "training.epochs": job_spec(dataset["id"], training__epochs=-1),
        "data.num_workers": job_spec(dataset["id"], data__num_workers=-2),
    }
    for path, spec in cases.items():
        message = issue_at(refused(user, spec), path)
        assert "-" in message and ("positive" in message or "greater than" in message), message


def test_huge_numbers_are_422_at_their_path_and_a_batch_larger_than_the_data_is_fine(user, dataset):
    assert "less than or equal to 1000000, found 1000000000000" in issue_at(
        refused(user, job_spec(dataset["id"], data__batch_size=10**12)), "data.batch_size"
    )
    assert "less than or equal to 4294967295" in issue_at(
        refused(user, job_spec(dataset["id"], seed=2**70)), "seed"
    )
    too_wide = job_spec(
        dataset["id"], model={"layers": [{"type": "linear", "out_features": 10**40}]}
    )
    assert "linear" in issue_at(refused(user, too_wide), "model.layers[0]")
    # 1e400 parses as infinity: refused by the range of the field
    body = json.dumps(job_spec(dataset["id"], training__optimizer={"type": "adam", "lr": 1.5}))
    message = issue_at(
        refused(user, body.replace("1.5", "1e400").encode()), "training.optimizer.lr"
    )
    assert "found inf" in message
    # one batch of a million rows over 64 rows is one short batch: valid
    response = user.post("/jobs/validate", json=job_spec(dataset["id"], data__batch_size=10**6))
    assert response.status_code == 200, response.text


def test_a_nul_character_anywhere_in_a_spec_is_422_at_its_path(user, dataset):
    # PostgreSQL cannot store U+0000: this was a 500 on Postgres, and stored on SQLite
    assert "NUL character" in issue_at(
        refused(user, job_spec(dataset["id"], name="a\x00b")), "name"
    )
    nul_id = job_spec("0" * 19 + "\x00")
    assert issue_at(refused(user, nul_id), "data.train") == "contains a NUL character (\\u0000)"
    layer = job_spec(
        dataset["id"], model={"layers": [{"type": "linear", "out_features": 3, "x\x00": 1}]}
    )
    assert "NUL character" in issue_at(refused(user, layer), "model.layers[0]")


def test_dataset_references_that_are_paths_are_unknown_ids(user, dataset):
    for ref in ("../../etc/passwd", "/etc/passwd", "..\\..\\windows", "%2e%2e%2fetc"):
        message = issue_at(refused(user, job_spec(ref)), "data.train")
        assert message == f"no dataset with id {ref!r}; upload one with POST /api/v1/datasets"
        message = issue_at(
            refused(user, job_spec(dataset["id"], data__validation=ref)), "data.validation"
        )
        assert repr(ref) in message


# ------------------------------------------------------------ out of memory


OOM_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path

    import torch
    from worker.engine.spec import parse_spec
    from worker.engine.train import run_job

    folder = Path(sys.argv[1])
    spec = parse_spec(json.loads((folder / "spec.json").read_text()))
    torch.ones(8).sum()  # torch's own start-up allocations happen before the limit
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
    room = (kib + 256 * 1024) * 1024  # 256 MiB of address space more than now
    resource.setrlimit(resource.RLIMIT_AS, (room, room))
    result = run_job(spec, folder / "run", resolve=lambda ref: folder / ref)
    print(json.dumps(result.as_dict()))
    """
)


def test_a_model_whose_weights_cannot_be_allocated_fails_with_a_one_line_reason(tmp_path):
    """The engine under a real allocation failure: 800 MB of weights in 256 MiB of room.

    run_job catches it and the run ends `failed`, "out of memory" and the allocator's line; on CUDA
    the same path maps torch.cuda.OutOfMemoryError to "out of GPU memory ...".
    """
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "train.npz",
        x=rng.normal(size=(32, 4)).astype("float32"),
        y=rng.integers(0, 3, 32),
    )
    spec = job_spec(
        "train.npz",
        model={
            "layers": [
                {"type": "linear", "out_features": 50_000_000},  # 250M parameters: under the limit
                {"type": "relu"},
                {"type": "linear", "out_features": 3},
            ]
        },
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "failed"
    error = result["error"]
    assert "\n" not in error
    assert error.startswith("out of memory")
    assert "can't allocate memory" in error and "800000000 bytes" in error
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["status"] == "failed" and written["error"] == error
