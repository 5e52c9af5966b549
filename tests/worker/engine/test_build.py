"""Specs become real torch models: shapes, parameter counts and outputs match hand-written torch."""

from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

from worker.engine.build import build_model
from worker.engine.errors import SpecError
from worker.engine.fields import FieldInfo
from worker.engine.layers import LAYERS, MERGE_OPS, layer_schema, resolve_type
from worker.engine.spec import job_schema, parse_spec

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def make_spec(model: dict, *, inputs: Any = "x", targets: Any = "y", loss: Any = "mse", **extra):
    doc = {
        "data": {"train": "train.npz", "inputs": inputs, "targets": targets},
        "model": model,
        "training": {"loss": loss},
        **extra,
    }
    return parse_spec(doc)


def sequential(*layers: dict, **kwargs: Any):
    return make_spec({"layers": list(layers)}, **kwargs)


def graph(nodes: list[dict], outputs: Any, **kwargs: Any):
    return make_spec({"nodes": nodes, "outputs": outputs}, **kwargs)


def floats(*shape: int) -> FieldInfo:
    return FieldInfo(tuple(shape), "float32")


def build_one(spec, shape: tuple[int, ...], dtype: str = "float32", **kwargs):
    return build_model(spec, {"input": FieldInfo(shape, dtype)}, device="cpu", **kwargs)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_by_node_name(ours: nn.Module, ref: nn.Module) -> None:
    """Load our weights into a hand-written module whose submodules are named as the nodes."""
    state = {k.removeprefix("layers."): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)


def copy_weights(ours: nn.Module, ref: nn.Module) -> None:
    """Load our weights into a hand-written torch model with the same parameter order."""
    with torch.no_grad():
        for mine, theirs in zip(ours.parameters(), ref.parameters(), strict=True):
            theirs.copy_(mine)


# ------------------------------------------------------------ model kinds


def test_mlp_matches_hand_written_sequential():
    spec = sequential(
        {"type": "linear", "out_features": 32},
        {"type": "ReLU"},
        {"type": "Linear", "out_features": 10, "name": "head"},
    )
    built = build_one(spec, (20,))
    ref = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    copy_weights(built.module, ref)
    x = torch.randn(4, 20)
    assert torch.allclose(built.module(x), ref(x))
    assert built.summary.total_params == params(ref)
    assert [r.name for r in built.summary.rows] == ["linear", "relu", "head"]
    assert built.output_shapes == {"output": (10,)}
    assert built.input_dtypes == {"input": torch.float32}


def test_cnn_with_batchnorm_pooling_and_flatten_matches_torch():
    spec = sequential(
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 16, "kernel_size": [3, 3], "padding": "same"},
        {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
        loss="cross_entropy",
    )
    built = build_one(spec, (3, 16, 16))
    ref = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding="same"),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    copy_weights(built.module, ref)
    built.module.eval()
    ref.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(built.module(x), ref(x), atol=1e-6)
    assert built.summary.total_params == params(ref)
    assert built.summary.rows[3].output_shape == (None, 8, 8, 8)


@pytest.mark.parametrize(
    ("layer", "shape", "ref", "out"),
    [
        (
            {"type": "conv1d", "out_channels": 6, "kernel_size": 5, "stride": 2},
            (4, 32),
            nn.Conv1d(4, 6, 5, stride=2),
            (6, 14),
        ),
        (
            {"type": "Conv3d", "out_channels": 2, "kernel_size": [1, 3, 3], "padding": [0, 1, 1]},
            (3, 4, 8, 8),
            nn.Conv3d(3, 2, (1, 3, 3), padding=(0, 1, 1)),
            (2, 4, 8, 8),
        ),
        (
            {"type": "ConvTranspose2d", "out_channels": 4, "kernel_size": 2, "stride": 2},
            (8, 5, 5),
            nn.ConvTranspose2d(8, 4, 2, stride=2),
            (4, 10, 10),
        ),
        (
            {"type": "groupnorm", "num_groups": 2},
            (6, 5, 5),
            nn.GroupNorm(2, 6),
            (6, 5, 5),
        ),
        ({"type": "layer_norm"}, (7, 12), nn.LayerNorm(12), (7, 12)),
    ],
)
def test_single_layer_matches_torch(layer, shape, ref, out):
    built = build_one(sequential(layer), shape)
    copy_weights(built.module, ref)
    x = torch.randn(3, *shape)
    assert torch.allclose(built.module(x), ref(x), atol=1e-6)
    assert built.output_shapes["output"] == out
    assert built.summary.total_params == params(ref)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_recurrent_layers_give_last_step_or_full_sequence(kind, bidirectional, return_sequences):
    layer = {
        "type": kind,
        "hidden_size": 6,
        "num_layers": 2,
        "bidirectional": bidirectional,
        "return_sequences": return_sequences,
    }
    built = build_one(sequential(layer), (7, 5))
    ref = getattr(nn, kind.upper())(
        5, 6, num_layers=2, bidirectional=bidirectional, batch_first=True
    )
    ref.load_state_dict(built.module.layers[kind].state_dict())
    x = torch.randn(3, 7, 5)
    out, state = ref(x)
    h_n = state[0] if kind == "lstm" else state
    dirs = 2 if bidirectional else 1
    if return_sequences:
        expected = out
    elif bidirectional:
        # the last layer's final forward and backward states
        expected = torch.cat([h_n[-2], h_n[-1]], dim=-1)
    else:
        expected = h_n[-1]
    got = built.module(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert built.output_shapes["output"] == ((7, 6 * dirs) if return_sequences else (6 * dirs,))
    assert built.summary.total_params == params(ref)
    if not return_sequences and not bidirectional:
        assert torch.allclose(got, out[:, -1], atol=1e-6)


def test_embedding_then_lstm_takes_integer_tokens():
    spec = sequential(
        {"type": "embedding", "num_embeddings": 50, "embedding_dim": 8, "padding_idx": 0},
        {"type": "lstm", "hidden_size": 16},
        {"type": "linear", "out_features": 3},
        loss="cross_entropy",
    )
    inputs = {"input": FieldInfo((12,), "int64", num_classes=50)}
    built = build_model(spec, inputs, {"output": FieldInfo((), "int64", 3)}, device="cpu")
    assert built.input_dtypes == {"input": torch.long}
    assert built.output_shapes == {"output": (3,)}
    tokens = torch.randint(0, 50, (4, 12))
    assert built.module(tokens).shape == (4, 3)
    expected = 50 * 8 + 4 * (16 * 8 + 16 * 16 + 2 * 16) + 16 * 3 + 3
    assert built.summary.total_params == expected


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_multihead_attention(causal):
    spec = sequential({"type": "MultiheadAttention", "num_heads": 4, "causal": causal})
    built = build_one(spec, (6, 16))
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ref.load_state_dict(built.module.layers["multiheadattention"].state_dict())
    x = torch.randn(2, 6, 16)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask)
    assert torch.allclose(built.module(x), expected, atol=1e-6)
    assert built.summary.total_params == params(ref)
    if causal:  # the first step attends to itself only, whatever comes later
        later = x.clone()
        later[:, 1:] = torch.randn(2, 5, 16)
        assert torch.allclose(built.module(x)[:, 0], built.module(later)[:, 0], atol=1e-6)


def test_transformer_encoder_layer_matches_torch():
    spec = sequential(
        {"type": "transformer_encoder_layer", "nhead": 2, "dim_feedforward": 32, "dropout": 0.0},
        {"type": "linear", "out_features": 1},
    )
    built = build_one(spec, (5, 8))
    block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    ref = nn.Sequential(block, nn.Linear(8, 1))
    copy_weights(built.module, ref)
    x = torch.randn(3, 5, 8)
    assert torch.allclose(built.module(x), ref(x), atol=1e-5)
    assert built.output_shapes["output"] == (5, 1)
    assert built.summary.total_params == params(ref)


def test_bilinear_takes_two_inputs():
    spec = graph(
        [{"name": "b", "type": "bilinear", "in": ["left", "right"], "out_features": 4}],
        "b",
        inputs={"left": "a", "right": "b"},
    )
    built = build_model(spec, {"left": floats(3), "right": floats(5)}, device="cpu")
    ref = nn.Bilinear(3, 5, 4)
    copy_weights(built.module, ref)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 5)
    assert torch.allclose(built.module(x1, x2), ref(x1, x2))
    assert built.summary.total_params == params(ref)


def test_reshape_and_permute_follow_torch_conventions():
    spec = sequential(
        {"type": "reshape", "shape": [4, -1]},
        {"type": "permute", "dims": [0, 2, 1]},
        {"type": "flatten", "start_dim": 1},
    )
    built = build_one(spec, (12,))
    x = torch.arange(24.0).reshape(2, 12)
    assert torch.equal(built.module(x), x.reshape(2, 4, 3).permute(0, 2, 1).reshape(2, 12))
    assert [r.output_shape for r in built.summary.rows] == [(None, 4, 3), (None, 3, 4), (None, 12)]


def residual_spec():
    return graph(
        [
            {"name": "out", "type": "linear", "in": "block", "out_features": 2},
            {"name": "d1", "type": "linear", "in": "input", "out_features": 16},
            {"name": "r1", "type": "relu", "in": "d1"},
            {"name": "d2", "type": "linear", "in": "r1", "out_features": 16},
            {"name": "block", "type": "add", "in": ["d2", "d1"]},
        ],
        "out",
    )


class Residual(nn.Module):
    """residual_spec() written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(16, 2)
        self.d1 = nn.Linear(8, 16)
        self.d2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.d1(x)
        return self.out(self.d2(torch.relu(h)) + h)


def test_residual_graph_in_any_order_matches_torch_and_trains():
    built = build_model(residual_spec(), {"input": floats(8)}, device="cpu")
    assert [r.name for r in built.summary.rows] == ["d1", "r1", "d2", "block", "out"]
    ref = Residual()
    assert built.summary.total_params == params(ref)
    assert built.output_shapes == {"output": (2,)}
    assert built.summary.rows[3].output_shape == (None, 16)
    load_by_node_name(built.module, ref)
    x = torch.randn(5, 8)
    out = built.module(x)
    assert out.shape == (5, 2)
    assert torch.allclose(out, ref(x))
    out.pow(2).mean().backward()
    grads = [p.grad for p in built.module.parameters()]
    assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads)


def image_meta_spec(**extra):
    return graph(
        [
            {"name": "c1", "type": "conv2d", "in": "image", "out_channels": 4, "kernel_size": 3},
            {"name": "pool", "type": "adaptive_avg_pool2d", "in": "c1", "output_size": 1},
            {"name": "flat", "type": "flatten", "in": "pool"},
            {"name": "both", "type": "concat", "in": ["flat", "meta"]},
            {"name": "head", "type": "linear", "in": "both", "out_features": 3},
        ],
        "head",
        inputs={"image": "pixels", "meta": ["age", "height"]},
        loss="cross_entropy",
        **extra,
    )


class ImageMeta(nn.Module):
    """image_meta_spec() written by hand: two inputs joined by a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.c1(image), 1).flatten(1)
        return self.head(torch.cat([pooled, meta], dim=-1))


def test_concat_of_image_and_meta_inputs_matches_torch_and_trains():
    inputs = {"image": floats(1, 8, 8), "meta": floats(2)}
    built = build_model(image_meta_spec(), inputs, device="cpu")
    assert built.module.input_names == ["image", "meta"]
    ref = ImageMeta()
    assert built.summary.total_params == params(ref)
    assert built.output_shapes == {"output": (3,)}
    assert [r.output_shape for r in built.summary.rows] == [
        (None, 4, 6, 6),
        (None, 4, 1, 1),
        (None, 4),
        (None, 6),
        (None, 3),
    ]
    load_by_node_name(built.module, ref)
    image, meta = torch.randn(4, 1, 8, 8), torch.randn(4, 2)
    out = built.module(image, meta)
    assert out.shape == (4, 3)
    assert torch.allclose(out, ref(image, meta), atol=1e-6)
    out.sum().backward()
    grads = [p.grad for p in built.module.parameters()]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_multi_output_model_returns_a_dict():
    spec = graph(
        [
            {"name": "trunk", "type": "linear", "in": "input", "out_features": 8},
            {"name": "cls", "type": "linear", "in": "trunk", "out_features": 4},
            {"name": "reg", "type": "linear", "in": "trunk", "out_features": 1},
        ],
        {"label": "cls", "value": "reg"},
        targets={"label": "y", "value": "v"},
        loss={"label": "cross_entropy", "value": "mse"},
    )
    targets = {"label": FieldInfo((), "int64", 4), "value": floats(1)}
    built = build_model(spec, {"input": floats(5)}, targets, device="cpu")
    assert built.module.output_names == ["label", "value"]
    assert built.output_shapes == {"label": (4,), "value": (1,)}
    ref = nn.ModuleDict({"trunk": nn.Linear(5, 8), "cls": nn.Linear(8, 4), "reg": nn.Linear(8, 1)})
    assert built.summary.total_params == params(ref)
    load_by_node_name(built.module, ref)
    x = torch.randn(3, 5)
    out = built.module(x)
    assert set(out) == {"label", "value"}
    assert out["label"].shape == (3, 4) and out["value"].shape == (3, 1)
    trunk = ref["trunk"](x)
    assert torch.allclose(out["label"], ref["cls"](trunk))
    assert torch.allclose(out["value"], ref["reg"](trunk))


def test_one_output_of_any_name_takes_the_one_target_and_input():
    # One target field and one output: nothing to match by name, whatever they are called.
    spec = graph(
        [
            {"name": "trunk", "type": "linear", "in": "pixels", "out_features": 8},
            {"name": "head", "type": "linear", "in": "trunk", "out_features": 4},
        ],
        {"digit": "head"},
        inputs="x",
        targets="y",
        loss="cross_entropy",
    )
    assert spec.data.input_fields() == {"pixels": "x"}
    assert spec.data.target_fields() == {"digit": "y"}
    targets = {"digit": FieldInfo((), "int64", 4)}
    built = build_model(spec, {"pixels": floats(5)}, targets, device="cpu")
    assert built.module.input_names == ["pixels"]
    assert built.module.output_names == ["digit"]
    assert built.output_shapes == {"digit": (4,)}
    assert built.module(torch.randn(3, 5)).shape == (3, 4)


def test_one_target_still_refuses_two_outputs():
    spec = graph(
        [
            {"name": "a", "type": "linear", "in": "input", "out_features": 1},
            {"name": "b", "type": "linear", "in": "input", "out_features": 1},
        ],
        {"first": "a", "second": "b"},
    )
    with pytest.raises(SpecError) as caught:
        build_model(spec, {"input": floats(5)}, {"output": floats(1)}, device="meta")
    assert "output 'first' has no target in data.targets (targets: output)" in str(caught.value)


def shared_spec():
    return graph(
        [
            {"name": "h", "type": "linear", "in": "a", "out_features": 8},
            {"name": "h2", "share": "h", "in": "b"},
            {"name": "sum", "type": "add", "in": ["h", "h2"]},
        ],
        "sum",
        inputs={"a": "a", "b": "b"},
    )


def test_shared_layer_is_one_module_with_one_set_of_weights():
    built = build_model(shared_spec(), {"a": floats(4), "b": floats(4)}, device="cpu")
    model = built.module
    assert list(model.state_dict()) == ["layers.h.weight", "layers.h.bias"]
    assert len(list(model.parameters())) == 2
    assert built.summary.total_params == 4 * 8 + 8
    shared = next(r for r in built.summary.rows if r.name == "h2")
    assert shared.shared_with == "h" and shared.params == 0
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    layer = model.layers["h"]
    # the module both nodes run is one object, so its Parameters (one tensor each) are too
    assert [key for _, key, _ in model._steps] == ["h", "h", "sum"]
    assert [p for p in model.parameters()] == [layer.weight, layer.bias]
    calls: list[torch.Tensor] = []
    layer.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    ref = nn.Linear(4, 8)  # written by hand: one Linear applied to both inputs
    assert built.summary.total_params == params(ref)
    assert built.output_shapes == {"output": (8,)}
    load_by_node_name(model, nn.ModuleDict({"h": ref}))
    out = model(a, b)
    assert len(calls) == 2 and calls[0] is a and calls[1] is b
    assert out.shape == (2, 8)
    assert torch.allclose(out, ref(a) + ref(b))
    with torch.no_grad():  # a change to the one tensor shows in both uses
        layer.weight.zero_()
        layer.bias.zero_()
    assert not model(a, b).any()
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    model(a, b).sum().backward()
    # both uses add to the one gradient
    assert torch.allclose(layer.weight.grad, torch.ones(2, 8).T @ (a + b))


def test_example_graph_shares_one_tensor_between_two_nodes():
    spec = parse_spec((EXAMPLES / "digits_graph.json").read_text())
    inputs = {"image": floats(1, 8, 8), "rows": floats(8), "cols": floats(8)}
    model = build_model(spec, inputs, device="cpu").module
    keys = {name: key for name, key, _ in model._steps}
    assert keys["enc_cols"] == keys["enc_rows"] == "enc_rows"
    names = [n for n, _ in model.named_parameters()]
    assert not any("enc_cols" in n for n in names)
    shared = model.layers["enc_rows"].weight
    assert sum(p is shared for p in model.parameters()) == 1
    rows, cols = torch.randn(2, 8), torch.randn(2, 8)
    out = model(torch.randn(2, 1, 8, 8), rows, cols)
    (out["digit"].sum() + out["ink"].sum()).backward()
    assert shared.grad is not None


# ------------------------------------------------------------------- meta


def test_meta_build_allocates_nothing_and_matches_cpu_summary():
    inputs = {"image": floats(1, 8, 8), "meta": floats(2)}
    meta = build_model(image_meta_spec(), inputs)
    cpu = build_model(image_meta_spec(), inputs, device="cpu")
    assert meta.summary.as_dict() == cpu.summary.as_dict()
    assert meta.output_shapes == cpu.output_shapes
    assert all(p.is_meta for p in meta.module.parameters())
    assert all(not p.is_meta for p in cpu.module.parameters())
    assert [n for n, _ in meta.module.named_parameters()] == [
        n for n, _ in cpu.module.named_parameters()
    ]


def test_summary_is_json_and_renders_as_a_table():
    built = build_model(image_meta_spec(), {"image": floats(1, 8, 8), "meta": floats(2)})
    as_dict = json.loads(json.dumps(built.summary.as_dict()))
    assert as_dict["input_shapes"] == {"image": [None, 1, 8, 8], "meta": [None, 2]}
    assert as_dict["rows"][0] == {
        "name": "c1",
        "type": "conv2d",
        "inputs": ["image"],
        "output_shape": [None, 4, 6, 6],
        "params": 40,
        "shared_with": None,
    }
    console = Console(width=120, record=True)
    console.print(built.summary.render())
    text = console.export_text()
    assert "(batch, 4, 6, 6)" in text and "Total params: 61" in text


# ------------------------------------------------------------------- init


def init_spec(init: Any, seed: int = 0, layer_init: Any = None):
    layer: dict[str, Any] = {"type": "linear", "out_features": 6}
    if layer_init is not None:
        layer["init"] = layer_init
    return make_spec(
        {
            "layers": [layer, {"type": "batchnorm1d"}, {"type": "linear", "out_features": 2}],
            "init": init,
        },
        seed=seed,
    )


def test_zeros_init_zeroes_weights_and_biases_but_not_norms():
    model = build_one(init_spec("zeros"), (4,)).module
    for name in ("linear", "linear_1"):
        assert not model.layers[name].weight.any() and not model.layers[name].bias.any()
    assert torch.equal(model.layers["batchnorm1d"].weight, torch.ones(6))


def test_same_seed_same_weights_and_different_seed_different_weights():
    first = build_one(init_spec("xavier_uniform", seed=7), (4,)).module.state_dict()
    again = build_one(init_spec("xavier_uniform", seed=7), (4,)).module.state_dict()
    other = build_one(init_spec("xavier_uniform", seed=8), (4,)).module.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["layers.linear.weight"], other["layers.linear.weight"])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_one(init_spec("default"), (4,))
    assert torch.equal(torch.rand(3), expected)


def test_kaiming_normal_std_matches_fan_in():
    spec = make_spec(
        {"layers": [{"type": "linear", "out_features": 512}], "init": "kaiming_normal"}
    )
    weight = build_one(spec, (1024,)).module.layers["linear"].weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.02)


def test_layer_init_overrides_model_init():
    spec = init_spec("zeros", layer_init={"weight": "ones", "bias": "default"})
    model = build_one(spec, (4,)).module
    assert torch.equal(model.layers["linear"].weight, torch.ones(6, 4))
    assert model.layers["linear"].bias.any()  # torch's own init kept
    assert not model.layers["linear_1"].weight.any()


def test_normal_init_on_a_norm_layer_of_its_own():
    spec = sequential({"type": "layernorm", "init": {"weight": "normal", "std": 0.5}})
    norm = build_one(spec, (256,)).module.layers["layernorm"]
    assert norm.weight.std().item() == pytest.approx(0.5, rel=0.2)
    assert not norm.bias.any()


def linear_weights(init: Any, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    spec = make_spec({"layers": [{"type": "linear", "out_features": 128}], "init": init}, seed=seed)
    layer = build_one(spec, (256,)).module.layers["linear"]
    return layer.weight.detach(), layer.bias.detach()


def test_default_init_is_torchs_own():
    weight, bias = linear_weights("default", seed=3)
    torch.manual_seed(3)
    ref = nn.Linear(256, 128)
    assert torch.equal(weight, ref.weight) and torch.equal(bias, ref.bias)


FAN_IN, FAN_OUT = 256, 128


@pytest.mark.parametrize(
    ("init", "std", "bound"),
    [
        ("kaiming_normal", math.sqrt(2 / FAN_IN), None),
        ("kaiming_uniform", math.sqrt(2 / FAN_IN), math.sqrt(6 / FAN_IN)),
        ("xavier_normal", math.sqrt(2 / (FAN_IN + FAN_OUT)), None),
        ("xavier_uniform", math.sqrt(2 / (FAN_IN + FAN_OUT)), math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("normal", 0.02, None),
        ("uniform", 0.1 / math.sqrt(12), 0.05),
    ],
)
def test_each_weight_init_has_its_spread_and_zeros_the_bias(init, std, bound):
    weight, bias = linear_weights(init)
    assert weight.std().item() == pytest.approx(std, rel=0.03)
    assert abs(weight.mean().item()) < std / 10
    if bound is not None:
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.95 * bound
    assert not bias.any()  # bias init alongside: zeros unless said otherwise


def test_orthogonal_and_zeros_inits():
    weight, _ = linear_weights("orthogonal")
    assert torch.allclose(weight @ weight.T, torch.eye(128), atol=1e-4)
    weight, _ = linear_weights({"weight": "orthogonal", "gain": 2.0})
    assert torch.allclose(weight @ weight.T, 4 * torch.eye(128), atol=1e-3)
    weight, bias = linear_weights("zeros")
    assert not weight.any() and not bias.any()


def test_bias_init_alongside_the_weight_init():
    _, bias = linear_weights({"weight": "xavier_uniform", "bias": "uniform", "a": 0.5, "b": 0.7})
    assert bias.min().item() >= 0.5 and bias.max().item() <= 0.7
    _, bias = linear_weights({"weight": "normal", "bias": "normal", "mean": 3.0, "std": 0.1})
    assert bias.mean().item() == pytest.approx(3.0, abs=0.1)
    _, default = linear_weights({"weight": "kaiming_normal", "bias": "default"})
    bound = 1 / math.sqrt(FAN_IN)  # torch's own bias init: uniform(-bound, bound)
    assert default.abs().max().item() <= bound
    assert default.min().item() < -bound / 2 and default.max().item() > bound / 2


def test_kaiming_init_reaches_conv_recurrent_and_attention_weights():
    spec = make_spec(
        {
            "layers": [
                {"type": "conv1d", "out_channels": 64, "kernel_size": 4},
                {"type": "permute", "dims": [0, 2, 1]},
                {"type": "lstm", "hidden_size": 64, "return_sequences": True},
                {"type": "multiheadattention", "num_heads": 4},
            ],
            "init": "kaiming_uniform",
        }
    )
    model = build_one(spec, (64, 10)).module
    for name, param in model.named_parameters():
        if "bias" in name:
            assert not param.any(), name
        else:
            fan_in = param[0].numel()
            assert param.abs().max().item() <= math.sqrt(6 / fan_in) + 1e-6, name


def test_the_issues_example_specs_parse_and_build():
    """The two documents of the issue that asked for the spec, field for field."""
    sequential_doc = {
        "name": "digits-resnet",
        "seed": 7,
        "data": {
            "train": "digits.npz",
            "validation": {"split": 0.2},
            "inputs": "x",
            "targets": "y",
            "batch_size": 64,
            "shuffle": True,
            "num_workers": 0,
        },
        "model": {
            "layers": [
                {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
                {"type": "batchnorm2d"},
                {"type": "relu"},
                {"type": "flatten"},
                {"type": "dropout", "p": 0.2},
                {"type": "linear", "out_features": 10},
            ],
            "init": "kaiming_normal",
        },
        "training": {
            "epochs": 20,
            "loss": "cross_entropy",
            "optimizer": {"type": "adam", "lr": 0.001},
            "metrics": ["accuracy"],
        },
        "callbacks": {"checkpoint": {"monitor": "val_accuracy", "mode": "max"}},
        "resources": {"gpus": 0},
        "max_restarts": 2,
    }
    spec = parse_spec(sequential_doc)
    assert (spec.name, spec.seed, spec.max_restarts) == ("digits-resnet", 7, 2)
    assert spec.data.validation.split == 0.2 and spec.data.batch_size == 64
    built = build_model(spec, {"input": floats(1, 8, 8)}, {"output": FieldInfo((), "int64", 10)})
    ref = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16 * 8 * 8, 10)
    )
    assert built.summary.total_params == params(ref)
    assert built.output_shapes == {"output": (10,)}

    graph_doc = {
        **sequential_doc,
        "data": {
            **sequential_doc["data"],
            "validation": "digits_val.npz",
            "inputs": {"image": "x", "meta": ["age", "height"], "other": "o"},
            "targets": {"digit": "y", "size": "area"},
        },
        "model": {
            "nodes": [
                {
                    "name": "c1",
                    "type": "conv2d",
                    "out_channels": 16,
                    "kernel_size": 3,
                    "padding": 1,
                    "in": "image",
                },
                {"name": "a1", "type": "relu", "in": "c1"},
                {
                    "name": "c2",
                    "type": "conv2d",
                    "out_channels": 16,
                    "kernel_size": 3,
                    "padding": 1,
                    "in": "a1",
                },
                {"name": "res", "type": "add", "in": ["a1", "c2"]},
                {"name": "f", "type": "flatten", "in": "res"},
                {"name": "cat", "type": "concat", "in": ["f", "meta"]},
                {"name": "h", "type": "linear", "out_features": 10, "in": "cat"},
                {"name": "h2", "share": "h", "in": "other"},
                {"name": "size", "type": "mean", "in": ["h", "h2"]},
            ],
            "outputs": {"digit": "h", "size": "size"},
        },
        "training": {"loss": {"digit": "cross_entropy", "size": "mse"}},
        "callbacks": {},
    }
    spec = parse_spec(graph_doc)
    inputs = {"image": floats(1, 8, 8), "meta": floats(2), "other": floats(16 * 64 + 2)}
    built = build_model(spec, inputs, device="cpu")
    assert built.output_shapes == {"digit": (10,), "size": (10,)}
    ref = nn.ModuleList([nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3), nn.Linear(16 * 64 + 2, 10)])
    assert built.summary.total_params == params(ref)
    out = built.module(torch.randn(2, 1, 8, 8), torch.randn(2, 2), torch.randn(2, 1026))
    assert out["digit"].shape == out["size"].shape == (2, 10)


# ------------------------------------------------------- the layer table

# One working use of every layer: (arguments, per-sample input shape).
SAMPLES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "linear": ({"out_features": 3}, (2, 5)),
    "bilinear": ({"out_features": 3}, (5,)),
    "conv1d": ({"out_channels": 3, "kernel_size": 3, "padding": "same"}, (2, 9)),
    "conv2d": ({"out_channels": 3, "kernel_size": 3, "stride": 2}, (2, 9, 9)),
    "conv3d": ({"out_channels": 3, "kernel_size": 2, "dilation": 2}, (2, 5, 5, 5)),
    "convtranspose1d": ({"out_channels": 3, "kernel_size": 3, "stride": 2}, (2, 9)),
    "convtranspose2d": (
        {"out_channels": 3, "kernel_size": 3, "output_padding": 1, "stride": 2},
        (2, 5, 5),
    ),
    "convtranspose3d": ({"out_channels": 3, "kernel_size": 2}, (2, 3, 3, 3)),
    "maxpool1d": ({"kernel_size": 2}, (2, 9)),
    "maxpool2d": ({"kernel_size": 3, "stride": 2, "ceil_mode": True}, (2, 9, 9)),
    "maxpool3d": ({"kernel_size": 2}, (2, 4, 4, 4)),
    "avgpool1d": ({"kernel_size": 3, "padding": 1}, (2, 9)),
    "avgpool2d": ({"kernel_size": 2}, (2, 9, 9)),
    "avgpool3d": ({"kernel_size": 2}, (2, 4, 4, 4)),
    "adaptiveavgpool1d": ({"output_size": 4}, (2, 9)),
    "adaptiveavgpool2d": ({"output_size": [2, 3]}, (2, 9, 9)),
    "adaptivemaxpool1d": ({"output_size": 4}, (2, 9)),
    "adaptivemaxpool2d": ({"output_size": 2}, (2, 9, 9)),
    "batchnorm1d": ({}, (4,)),
    "batchnorm2d": ({"momentum": None}, (4, 3, 3)),
    "batchnorm3d": ({}, (4, 2, 2, 2)),
    "layernorm": ({"normalized_shape": [6]}, (3, 6)),
    "groupnorm": ({"num_groups": 2}, (4, 5)),
    "dropout": ({"p": 0.1}, (5,)),
    "dropout1d": ({}, (3, 5)),
    "dropout2d": ({}, (3, 5, 5)),
    "embedding": ({"num_embeddings": 10, "embedding_dim": 4}, (6,)),
    "lstm": ({"hidden_size": 4, "proj_size": 2, "bidirectional": True}, (6, 3)),
    "gru": ({"hidden_size": 4, "return_sequences": True}, (6, 3)),
    "rnn": ({"hidden_size": 4, "nonlinearity": "relu"}, (6, 3)),
    "multiheadattention": ({"num_heads": 2, "bias": False}, (6, 4)),
    "transformerencoderlayer": ({"nhead": 2, "dim_feedforward": 8, "activation": "gelu"}, (6, 4)),
    "flatten": ({"start_dim": 2}, (2, 3, 4)),
    "reshape": ({"shape": [3, -1, 2]}, (12,)),
    "permute": ({"dims": [0, 3, 1, 2]}, (2, 3, 4)),
    "identity": ({}, (3,)),
    "relu": ({}, (3,)),
    "leaky_relu": ({"negative_slope": 0.2}, (3,)),
    "gelu": ({"approximate": "tanh"}, (3,)),
    "silu": ({}, (3,)),
    "elu": ({"alpha": 0.5}, (3,)),
    "selu": ({}, (3,)),
    "prelu": ({"num_parameters": 3}, (3, 4)),
    "mish": ({}, (3,)),
    "softplus": ({"beta": 2}, (3,)),
    "hardswish": ({}, (3,)),
    "tanh": ({}, (3,)),
    "sigmoid": ({}, (3,)),
    "softmax": ({"dim": 1}, (3, 4)),
    "log_softmax": ({}, (3, 4)),
}


def test_every_layer_has_a_sample():
    assert set(SAMPLES) == {layer.name for layer in LAYERS.values()}


# What torch's constructors require that follows from the input shape: never written.
SHAPE_ARGS = {
    "in_features",
    "in1_features",
    "in2_features",
    "in_channels",
    "num_features",
    "normalized_shape",
    "num_channels",
    "input_size",
    "embed_dim",
    "d_model",
}


def test_shape_arguments_are_inferred_not_required():
    for layer in LAYERS.values():
        factory = getattr(layer.factory, "func", layer.factory)
        signature = inspect.signature(factory.__init__)
        needed = {
            name
            for name, p in signature.parameters.items()
            if name != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        }
        if issubclass(factory, nn.RNNBase):
            needed.add("input_size")  # nn.LSTM & co take it through *args
        required = {a.name for a in layer.args if a.required}
        assert needed <= required | set(layer.inferred), layer.name
        assert not required & SHAPE_ARGS, layer.name
        assert needed & SHAPE_ARGS <= set(layer.inferred), layer.name


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize(
    "name",
    sorted(n for n, d in SAMPLES.items() if resolve_type(n).inferred),  # type: ignore[union-attr]
)
def test_layers_build_without_their_shape_arguments(name):
    layer = resolve_type(name)
    assert layer is not None
    args = {k: v for k, v in SAMPLES[name][0].items() if k not in layer.inferred}
    shape = SAMPLES[name][1]
    nodes = [{"name": "node", "type": name, "in": ["input"] * (layer.inputs or 1), **args}]
    module = build_model(graph(nodes, "node"), {"input": floats(*shape)}, device="cpu").module
    built = module.layers["node"]
    for arg in layer.inferred:
        value = getattr(built, arg, None)
        if arg == "input_size":
            assert value == shape[-1]
        elif value is not None:
            assert value in (shape[0], shape[-1], (shape[-1],)), (arg, value)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_inferred_output_shape_is_what_torch_gives(name):
    args, shape = SAMPLES[name]
    layer = resolve_type(name)
    assert layer is not None
    integer = layer.integer_input
    nodes = [{"name": "node", "type": name, "in": ["input"] * (layer.inputs or 2), **args}]
    spec = graph(nodes, "node")
    info = FieldInfo(shape, "int64" if integer else "float32")
    built = build_model(spec, {"input": info}, device="cpu")
    x = torch.randint(0, 10, (2, *shape)) if integer else torch.randn(2, *shape)
    out = built.module(x)
    assert tuple(out.shape[1:]) == built.output_shapes["output"]


def test_merge_ops_shapes_are_what_torch_gives():
    nodes = [
        {"name": "add", "type": "add", "in": ["a", "b"]},
        {"name": "mul", "type": "Multiply", "in": ["a", "b"]},
        {"name": "mean", "type": "mean", "in": ["a", "b", "a"]},
        {"name": "cat", "type": "concat", "in": ["a", "b"], "dim": 1},
    ]
    spec = graph(
        nodes,
        {n["name"]: n["name"] for n in nodes},
        inputs={"a": "a", "b": "b"},
        targets={n["name"]: "t" for n in nodes},
    )
    built = build_model(spec, {"a": floats(3, 4), "b": floats(1, 4)}, device="cpu")
    a, b = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
    out = built.module(a, b)
    assert torch.allclose(out["add"], a + b) and torch.allclose(out["mul"], a * b)
    assert torch.allclose(out["mean"], (a + b + a) / 3)
    assert torch.equal(out["cat"], torch.cat([a, b], dim=1))
    assert built.output_shapes == {"add": (3, 4), "mul": (3, 4), "mean": (3, 4), "cat": (4, 4)}


@pytest.mark.parametrize(
    "name",
    [
        "Conv2d",
        "conv2d",
        "leaky_relu",
        "LeakyReLU",
        "log_softmax",
        "LogSoftmax",
        "transformer_encoder_layer",
        "MultiheadAttention",
        "BatchNorm2d",
        "max_pool2d",
    ],
)
def test_type_names_resolve_case_and_underscore_free(name):
    assert resolve_type(name) is not None


def test_declared_arguments_and_defaults_are_torchs():
    """Our argument table must not drift from torch's signatures."""
    ours_only = {"return_sequences", "causal", "shape", "dims"}
    # torch's dim=None picks a dim by rank, with a deprecation warning; we say -1
    different = {("softmax", "dim"), ("log_softmax", "dim")}
    for layer in [*LAYERS.values(), *MERGE_OPS.values()]:
        factory = getattr(layer.factory, "func", layer.factory)
        if not factory.__module__.startswith("torch.nn"):
            continue
        signature = inspect.signature(factory.__init__)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue  # nn.LSTM & co take **kwargs
        for arg in layer.args:
            if arg.name in ours_only:
                continue
            assert arg.name in signature.parameters, (layer.name, arg.name)
            default = signature.parameters[arg.name].default
            if not arg.required and (layer.name, arg.name) not in different:
                default = getattr(default, "__name__", default)  # activation=F.relu is "relu"
                assert arg.default == default, (layer.name, arg.name, arg.default, default)
        for name in (*layer.inferred, *layer.fixed):
            assert name in signature.parameters, (layer.name, name)


def test_layer_schema_lists_every_layer_and_is_json():
    schema = layer_schema()
    conv = schema["layers"]["conv2d"]
    assert conv["inferred"] == ["in_channels"]
    assert conv["args"]["kernel_size"]["required"] is True
    assert conv["args"]["padding"]["default"] == 0
    assert "leaky_relu" in schema["description"] and "concat" in schema["layers"]
    assert "device" not in conv["args"] and "batch_first" not in schema["layers"]["lstm"]["args"]
    json.dumps(job_schema())


def test_ten_thousand_nodes_validate_quickly():
    nodes = [{"name": "n0", "type": "linear", "in": "input", "out_features": 16}]
    for i in range(1, 10_000):
        kind = {"type": "linear", "out_features": 16} if i % 2 else {"type": "relu"}
        nodes.append({"name": f"n{i}", "in": f"n{i - 1}", **kind})
    spec = graph(nodes, "n9999")
    start = time.perf_counter()
    built = build_model(spec, {"input": floats(16)})
    assert time.perf_counter() - start < 5
    assert built.summary.total_params == 5_001 * (16 * 16 + 16)
