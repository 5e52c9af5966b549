"""The `torchyard` command as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCHYARD = [sys.executable, "-m", "app.cli"]


def torchyard(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), **(env or {})}
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
    from worker.engine.layers import layer_schema

    text = (ROOT / "docs" / "layers.md").read_text()
    assert layer_schema()["description"] in text, "regenerate docs/layers.md from layer_schema()"


def _hostile(layers: list | None = None, graph: dict | None = None) -> dict:
    spec = json.loads((ROOT / "examples" / "digits_cnn.json").read_text())
    spec["data"]["train"] = "does-not-exist.npz"
    if layers is not None:
        spec["model"]["layers"] = layers
    if graph is not None:
        spec["model"] = graph
    return spec


FLAT = {"type": "flatten"}
HOSTILE = {
    "kernel_larger_than_input": (
        _hostile([{"type": "conv2d", "out_channels": 4, "kernel_size": 20}, FLAT]),
        "model.layers[0]: conv2d cannot take input (batch, 1, 8, 8): kernel size (20, 20) is "
        "larger than the input (8, 8, after padding)",
    ),
    "negative_out_features": (
        _hostile([FLAT, {"type": "linear", "out_features": -5}]),
        "model.layers[1].out_features: expected a positive integer, found -5",
    ),
    "string_for_an_integer": (
        _hostile([FLAT, {"type": "linear", "out_features": "10"}]),
        "model.layers[1].out_features: expected an integer, found '10'",
    ),
    "in_naming_itself": (
        _hostile(
            graph={
                "nodes": [
                    {"name": "a", "type": "relu", "in": "a"},
                    {"name": "b", "type": "flatten", "in": "input"},
                    {"name": "c", "type": "linear", "out_features": 64, "in": "b"},
                    {"name": "out", "type": "add", "in": ["a", "c"]},
                ],
                "outputs": "out",
            }
        ),
        "model.nodes: cycle a -> a",
    ),
    "over_the_parameter_limit": (
        _hostile([FLAT, {"type": "linear", "out_features": 10_000_000}]),
        "model: 650,000,000 parameters, more than the limit of 500,000,000",
    ),
    "unknown_layer_type": (
        _hostile([{"type": "Conv2", "out_channels": 4, "kernel_size": 3}, FLAT]),
        "model.layers[0].type: unknown layer type 'Conv2' (closest: conv2d",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_specs_get_one_line_with_path_and_message(tmp_path, case):
    spec, expected = HOSTILE[case]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    run = torchyard("validate", str(path), "--input-shape", "x=1,8,8")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {expected}"), run.stderr


def test_deeply_nested_and_non_finite_json_are_one_line(tmp_path):
    spec = json.dumps(
        _hostile([FLAT, {"type": "dropout", "p": 0.25}, {"type": "linear", "out_features": 10}])
    )
    assert '"p": 0.25' in spec and '"out_features": 10' in spec
    deep = tmp_path / "deep.json"
    deep.write_text(spec.replace('"out_features": 10', '"out_features": ' + "[" * 100_000))
    nan = tmp_path / "nan.json"
    nan.write_text(spec.replace('"p": 0.25', '"p": NaN'))
    for path, expected in [
        (deep, "error: JSON nested too deeply\n"),
        (nan, "error: model.layers[1].p: expected a finite number, found nan\n"),
    ]:
        run = torchyard("validate", str(path), "--input-shape", "x=1,8,8")
        assert (run.returncode, run.stderr) == (1, expected)


def test_validate_takes_the_parameter_limit_from_the_environment(tmp_path):
    path = ROOT / "examples" / "digits_cnn.json"
    small = torchyard(
        "validate", str(path), "--input-shape", "x=1,8,8", env={"TORCHYARD_MAX_PARAMS": "1000"}
    )
    assert small.returncode == 1
    assert small.stderr == "error: model: 151,498 parameters, more than the limit of 1,000\n"
    bad = torchyard(
        "validate", str(path), "--input-shape", "x=1,8,8", env={"TORCHYARD_MAX_PARAMS": "many"}
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: TORCHYARD_MAX_PARAMS: ")
    assert bad.stderr.count("\n") == 1 and "'many'" in bad.stderr


def test_local_training_keeps_to_the_parameter_limit(examples_dir, tmp_path):
    out = tmp_path / "run"
    run = torchyard(
        "train",
        str(examples_dir / "tabular_mlp.json"),
        "--out",
        str(out),
        "-q",
        env={"TORCHYARD_MAX_PARAMS": "1000"},
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    assert "model: 4,617 parameters, more than the limit of 1,000" in run.stdout + run.stderr
    assert json.loads((out / "result.json").read_text())["status"] == "failed"


def test_validate_needs_none_of_the_services_settings(tmp_path):
    """A shell set up for a deployed service (Postgres, no secrets here) still validates."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHYARD_")}
    env["TORCHYARD_DATABASE_URL"] = "postgresql+psycopg://user@db.invalid/torchyard"
    run = subprocess.run(
        [
            *TORCHYARD,
            "validate",
            str(ROOT / "examples" / "digits_cnn.json"),
            "--input-shape",
            "x=1,8,8",
        ],
        cwd=tmp_path,
        env={**env, "COLUMNS": "200", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Total params: 151,498" in run.stdout


def _readme_spec_examples() -> dict[str, dict]:
    """Each `### ... (`examples/NAME.json`)` heading of README's spec section and its JSON."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The job spec") : text.index("### Sections")]
    found = {}
    for match in re.finditer(
        r"### [^\n]*\(`examples/([\w.]+)`\)\n.*?```json\n(.*?)```", section, re.S
    ):
        found[match[1]] = json.loads(match[2])
    return found


def test_readme_shows_each_model_kind_as_its_example_file():
    examples = _readme_spec_examples()
    assert set(examples) == {"digits_cnn.json", "digits_graph.json"}
    assert "layers" in examples["digits_cnn.json"]["model"]
    assert "nodes" in examples["digits_graph.json"]["model"]
    for name, shown in examples.items():
        assert shown == json.loads((ROOT / "examples" / name).read_text()), name
