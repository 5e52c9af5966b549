"""Export round trip: a trained model as torch.export .pt2 and ONNX gives PyTorch's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worker.engine.build import build_model
from worker.engine.data import describe, resolve_fields
from worker.engine.export import ExportError, export_model
from worker.engine.spec import parse_spec
from worker.engine.train import run_job


@pytest.fixture(scope="module")
def trained_graph(examples_dir, tmp_path_factory):
    """The multi-input, multi-output digits graph, trained for one epoch."""
    import json

    doc = json.loads((examples_dir / "digits_graph.json").read_text())
    doc["training"]["epochs"] = 1
    spec = parse_spec(doc)
    run_dir = tmp_path_factory.mktemp("graph-run")
    result = run_job(spec, run_dir, resolve=lambda ref: examples_dir / ref)
    assert result.status == "succeeded", result.error
    inputs, _ = resolve_fields(spec.data, describe(examples_dir / spec.data.train).fields)
    return spec, inputs, run_dir / "best.safetensors", examples_dir


def reference_outputs(spec, inputs, weights, batch):
    model = build_model(spec, inputs, None, device="cpu").module
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    with torch.no_grad():
        return model(*batch)


def a_batch(examples_dir, n=5):
    arrays = np.load(examples_dir / "data" / "digits_val.npz")
    return tuple(torch.from_numpy(arrays[field][:n]) for field in ("x", "rows", "cols"))


def test_pt2_export_matches_pytorch_for_any_batch_size(trained_graph, tmp_path):
    spec, inputs, weights, examples_dir = trained_graph
    out = export_model(spec, inputs, weights, tmp_path / "model.pt2", "pt2")
    program = torch.export.load(str(out)).module()
    for n in (1, 7):
        batch = a_batch(examples_dir, n)
        want = reference_outputs(spec, inputs, weights, batch)
        got = program(*batch)
        for name in ("digit", "ink"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


def test_onnx_export_matches_pytorch(trained_graph, tmp_path):
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    spec, inputs, weights, examples_dir = trained_graph
    out = export_model(spec, inputs, weights, tmp_path / "model.onnx", "onnx")
    batch = a_batch(examples_dir, 4)
    want = reference_outputs(spec, inputs, weights, batch)
    session = ReferenceEvaluator(str(out))
    names = [i.name for i in session.proto_.graph.input]
    got = session.run(None, dict(zip(names, (b.numpy() for b in batch), strict=True)))
    np.testing.assert_allclose(got[0], want["digit"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want["ink"].numpy(), rtol=1e-4, atol=1e-5)


def test_weights_of_another_model_are_refused_in_one_line(trained_graph, tmp_path):
    spec, inputs, weights, _ = trained_graph
    doc = spec.dump()
    doc["model"]["nodes"][10]["out_features"] = 32  # the hidden layer: other shapes
    with pytest.raises(ExportError) as info:
        export_model(parse_spec(doc), inputs, weights, tmp_path / "m.pt2", "pt2")
    assert "does not fit this spec's model" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.pt2").exists()
