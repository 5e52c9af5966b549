"""The `torchyard` command as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCHYARD = [sys.executable, "-m", "app.cli"]


def torchyard(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*TORCHYARD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["digits_cnn.json", "digits_graph.json", "tabular_mlp.json"])
def test_every_example_validates_and_prints_a_summary(examples_dir, name):
    run = torchyard("validate", str(examples_dir / name))
    assert run.returncode == 0, run.stderr
    assert "Total params" in run.stdout
    assert "Output shape" in run.stdout


def test_validate_json_summary_counts_parameters(examples_dir):
    run = torchyard("validate", str(examples_dir / "tabular_mlp.json"), "--json")
    summary = json.loads(run.stdout)
    # batchnorm1d(3) 6 + linear 3->64 256 + 64->64 4160 + 64->3 195
    assert summary["total_params"] == 6 + 256 + 4160 + 195


def test_validate_without_a_dataset_takes_input_shapes(tmp_path):
    spec = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    spec["data"]["train"] = "does-not-exist.npz"
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    run = torchyard("validate", str(path), "--input-shape", "x=1,8,8")
    assert run.returncode == 0, run.stderr
    assert "(batch, 10)" in run.stdout
    missing = torchyard("validate", str(path))
    assert missing.returncode == 1
    assert "data.train" in missing.stderr and "--input-shape" in missing.stderr


def test_bad_spec_exits_non_zero_naming_each_path_without_a_traceback(tmp_path):
    spec = {
        "data": {"train": "x.npz", "inputs": {"image": "x"}, "targets": "y"},
        "model": {
            "nodes": [
                {"name": "c1", "type": "conv2", "out_channels": 4, "in": "image"},
                {"name": "f", "type": "flatten", "in": "c9"},
                {"name": "h", "type": "linear", "out_features": "ten", "in": "f"},
            ],
            "outputs": "h",
        },
        "training": {"loss": "cross_entropy"},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    run = torchyard("validate", str(path), "--input-shape", "image=1,8,8")
    assert run.returncode == 1
    assert "model.nodes[0].type: unknown layer type 'conv2' (closest: conv2d" in run.stderr
    assert "model.nodes[1].in: unknown node 'c9'" in run.stderr
    assert "model.nodes[2].out_features: expected an integer, found 'ten'" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_malformed_json_is_one_clear_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": ')
    run = torchyard("validate", str(path))
    assert run.returncode == 1
    assert "malformed JSON" in run.stderr
    assert "Traceback" not in run.stderr


def test_schema_lists_the_spec_sections_and_layer_types():
    run = torchyard("schema")
    schema = json.loads(run.stdout)
    assert {"data", "model", "training", "callbacks", "resources", "max_restarts"} <= set(
        schema["properties"]
    )
    assert "conv2d" in json.dumps(schema)


def test_train_then_export_from_the_command_line(examples_dir, tmp_path):
    spec = json.loads((examples_dir / "tabular_mlp.json").read_text())
    spec["training"]["epochs"] = 2
    path = examples_dir / "tabular_short.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "run"
    run = torchyard("train", str(path), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "succeeded: 2 epochs" in run.stdout
    for name in ("metrics.jsonl", "best.safetensors", "last.pt", "result.json"):
        assert (out / name).exists()
    exported = torchyard(
        "export",
        str(path),
        str(out / "best.safetensors"),
        "--format",
        "pt2",
        "--out",
        str(tmp_path / "m.pt2"),
    )
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "m.pt2").stat().st_size > 0
    # --resume with nothing left to do keeps the result and exits 0
    again = torchyard("train", str(path), "--out", str(out), "--resume", "-q")
    assert again.returncode == 0, again.stderr


def test_failed_run_exits_1_with_the_reason(examples_dir, tmp_path):
    spec = json.loads((examples_dir / "digits_cnn.json").read_text())
    spec["data"]["targets"] = "label"
    path = examples_dir / "digits_bad_target.json"
    path.write_text(json.dumps(spec))
    run = torchyard("train", str(path), "--out", str(tmp_path / "run"), "-q")
    assert run.returncode == 1
    assert "data.targets" in run.stderr and "label" in run.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


def test_docs_layers_md_is_current():
    from worker.layers import layer_schema

    text = (ROOT / "docs" / "layers.md").read_text()
    assert layer_schema()["description"] in text, "regenerate docs/layers.md from layer_schema()"
