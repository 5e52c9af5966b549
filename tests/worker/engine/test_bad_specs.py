"""Specs that cannot run: each problem is reported at its JSON path, saying what was found and
what was expected, all problems at once, and never as a traceback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.engine.build import build_model
from worker.engine.errors import SpecError
from worker.engine.fields import FieldInfo
from worker.engine.spec import parse_spec


def make_spec(model: dict, *, inputs: Any = "x", targets: Any = "y", loss: Any = "mse", **extra):
    training = {"loss": loss, **extra.pop("training", {})}
    data = {"train": "train.npz", "inputs": inputs, "targets": targets, **extra.pop("data", {})}
    doc = {
        "data": data,
        "model": model,
        "training": training,
        **extra,
    }
    return parse_spec(doc)


def layers(*items: dict, **kwargs: Any):
    return make_spec({"layers": list(items)}, **kwargs)


def nodes(items: list[dict], outputs: Any = "out", **kwargs: Any):
    return make_spec({"nodes": items, "outputs": outputs}, **kwargs)


def floats(*shape: int) -> FieldInfo:
    return FieldInfo(tuple(shape), "float32")


def problems(spec, inputs: dict | None = None, targets: dict | None = None, **kwargs) -> dict:
    """Build and expect a SpecError: {path: message} (messages at one path joined by ' | ')."""
    with pytest.raises(SpecError) as caught:
        build_model(spec, inputs or {"input": floats(16)}, targets, **kwargs)
    found: dict[str, str] = {}
    for issue in caught.value.issues:
        found[issue.path] = (
            f"{found[issue.path]} | {issue.message}" if issue.path in found else issue.message
        )
    return found


def dense(n: int = 8) -> dict:
    return {"type": "linear", "out_features": n}


# ----------------------------------------------------------------- layers


def test_unknown_layer_type_names_the_closest():
    found = problems(layers(dense(), dense(), {"type": "conv2", "out_channels": 4}))
    assert found["model.layers[2].type"].startswith("unknown layer type 'conv2' (closest: conv2d")


def test_unknown_argument_names_the_closest():
    found = problems(
        layers({"type": "conv1d", "out_channels": 4, "kernal_size": 3}), {"input": floats(2, 9)}
    )
    assert found["model.layers[0].kernal_size"] == (
        "unknown argument 'kernal_size' for conv1d (closest: kernel_size)"
    )
    assert found["model.layers[0].kernel_size"] == "missing (required by conv1d)"


def test_missing_required_argument():
    found = problems(layers({"type": "linear"}))
    assert found == {"model.layers[0].out_features": "missing (required by linear)"}


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [
        ("out_features", "ten", "expected an integer, found 'ten'"),
        ("out_features", True, "expected an integer, found true"),
        ("out_features", 2.5, "expected an integer, found 2.5"),
        ("out_features", 0, "expected a positive integer, found 0"),
        ("bias", "yes", "expected true or false, found 'yes'"),
    ],
)
def test_wrong_argument_type(arg, value, message):
    layer = {**dense(), arg: value}
    found = problems(layers(dense(), dense(), dense(), dense(), dense(), layer))
    assert found == {f"model.layers[5].{arg}": message}


def test_list_arguments_must_have_the_layers_rank():
    spec = layers(
        {"type": "conv2d", "out_channels": 4, "kernel_size": [3, 3, 3], "padding": "full"}
    )
    found = problems(spec, {"input": floats(1, 8, 8)})
    assert (
        "a positive integer or a list of 2 positive integers"
        in found["model.layers[0].kernel_size"]
    )
    assert "'same' or 'valid'" in found["model.layers[0].padding"]
    assert "found 'full'" in found["model.layers[0].padding"]


def test_written_inferred_argument_must_match_the_input():
    spec = layers({"type": "linear", "out_features": 4, "in_features": 32})
    found = problems(spec, {"input": floats(64)})
    assert found == {
        "model.layers[0].in_features": "in_features is inferred from the input (64); found 32"
    }
    layers_ok = layers({"type": "linear", "out_features": 4, "in_features": 64})
    build_model(layers_ok, {"input": floats(64)})


def test_recurrent_layers_refuse_batch_first_false():
    spec = layers({"type": "lstm", "hidden_size": 4, "batch_first": False})
    found = problems(spec, {"input": floats(5, 3)})
    message = found["model.layers[0].batch_first"]
    assert "batch_first=true" in message and "(batch, time, features)" in message
    assert "found false" in message


def test_wrong_input_rank_says_what_the_layer_expects():
    found = problems(layers({"type": "conv2d", "out_channels": 4, "kernel_size": 3}))
    assert found == {
        "model.layers[0]": "conv2d cannot take input (batch, 16): it expects "
        "(batch, channels, height, width)"
    }


def test_kernel_larger_than_input():
    spec = layers(
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
    )
    found = problems(spec, {"input": floats(1, 10, 10)})
    message = found["model.layers[3]"]
    assert message.startswith("conv2d cannot take input (batch, 16, 2, 2): kernel size (3, 3)")
    assert "larger than the input" in message


def test_dimension_going_to_zero():
    spec = layers({"type": "maxpool1d", "kernel_size": 4})
    found = problems(spec, {"input": floats(3, 2)})
    assert "a dimension goes to zero or below" in found["model.layers[0]"]
    assert "(batch, 3, 2)" in found["model.layers[0]"]


def test_torch_constructor_errors_become_one_line():
    found = problems(layers({"type": "groupnorm", "num_groups": 3}), {"input": floats(16, 4)})
    assert found["model.layers[0]"] == (
        "groupnorm: num_channels (16) must be divisible by num_groups (3)"
    )
    found = problems(layers({"type": "dropout", "p": 1.5}))
    assert found["model.layers[0]"].startswith(
        "dropout: dropout probability has to be between 0 and 1"
    )


def test_attention_heads_must_divide_the_embedding():
    spec = layers({"type": "multiheadattention", "num_heads": 3})
    found = problems(spec, {"input": floats(5, 16)})
    assert "embed_dim 16" in found["model.layers[0]"] and "num_heads 3" in found["model.layers[0]"]


def test_layers_may_not_touch_the_batch_dim():
    spec = layers(
        {"type": "flatten", "start_dim": 0},
        {"type": "softmax", "dim": 0},
        {"type": "permute", "dims": [1, 0]},
    )
    found = problems(spec, {"input": floats(4, 4)})
    assert "start_dim 0 is the batch dim" in found["model.layers[0]"]
    assert "dims starting with 0" in found["model.layers[2].dims"]


def test_reshape_must_keep_the_number_of_values():
    found = problems(layers({"type": "reshape", "shape": [5, -1]}), {"input": floats(3, 4)})
    assert found["model.layers[0]"] == (
        "reshape cannot take input (batch, 3, 4): its 12 values per sample do not fit "
        "shape (batch, 5, -1)"
    )


def test_sequential_layers_take_no_in_or_share_and_no_merge_ops():
    spec = layers({**dense(), "in": "x"}, {"type": "add"})
    found = problems(spec)
    assert "'in' belongs to graph models" in found["model.layers[0].in"]
    assert "add merges several inputs" in found["model.layers[1].type"]


def test_sequential_model_with_two_inputs_points_to_nodes():
    spec = layers(dense(), inputs={"a": "a", "b": "b"})
    found = problems(spec, {"a": floats(3), "b": floats(3)})
    assert "use 'nodes' and 'outputs'" in found["model.layers"]


# ------------------------------------------------------------------ graphs


def test_cycle():
    spec = nodes(
        [
            {"name": "a", "type": "add", "in": ["input", "b"]},
            {"name": "b", "type": "relu", "in": "a"},
            {"name": "out", "type": "linear", "in": "b", "out_features": 1},
        ]
    )
    assert problems(spec) == {"model.nodes": "cycle a -> b -> a"}


def test_node_whose_in_names_itself():
    spec = nodes(
        [
            {"name": "a", "type": "relu", "in": "a"},
            {"name": "out", **dense(1), "in": ["a"]},
        ]
    )
    assert problems(spec) == {
        "model.nodes": "cycle a -> a",
        "data.inputs": "input 'input' is not used by any node",
    }


def test_node_used_by_nobody():
    spec = nodes(
        [
            {"name": "h", **dense(), "in": "input"},
            {"name": "r", "type": "relu", "in": "h"},
            {"name": "out", **dense(1), "in": "r"},
            {"name": "side", "type": "tanh", "in": "h"},
            {"name": "x", "type": "sigmoid", "in": "side"},
        ]
    )
    assert problems(spec) == {"model.nodes[4]": "node 'x' is not used by any node or output"}


def test_input_used_by_nobody():
    spec = nodes([{"name": "out", **dense(1), "in": "image"}], inputs={"image": "a", "meta": "b"})
    found = problems(spec, {"image": floats(4), "meta": floats(2)})
    assert found == {"data.inputs.meta": "input 'meta' is not used by any node"}


def test_in_naming_an_unknown_node_lists_the_known_ones():
    spec = nodes(
        [
            {"name": "c1", **dense(), "in": "image"},
            {"name": "a1", "type": "relu", "in": "c1"},
            {"name": "out", **dense(1), "in": "a1"},
            {"name": "x", "type": "relu", "in": "c9"},
        ],
        inputs={"image": "a"},
    )
    found = problems(spec, {"image": floats(4)})
    assert found["model.nodes[3].in"] == "unknown node 'c9' (known: image, c1, a1, out, x)"


def test_in_list_names_the_bad_entry():
    spec = nodes([{"name": "out", "type": "add", "in": ["input", "inptu"]}])
    found = problems(spec)
    assert found["model.nodes[0].in[1]"].startswith("unknown node 'inptu'")


def test_graph_without_outputs_or_a_node_without_in():
    with pytest.raises(SpecError) as caught:
        make_spec({"nodes": [{"name": "h", **dense(), "in": "input"}]})
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("model", "a graph model needs 'outputs' naming its output node(s)")
    ]
    with pytest.raises(SpecError) as caught:
        nodes([{"name": "out", **dense()}])
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("model.nodes[0].in", "missing (required)")
    ]


def test_output_naming_an_unknown_node():
    spec = nodes([{"name": "h", **dense(), "in": "input"}], outputs="hh")
    found = problems(spec)
    assert found["model.outputs"] == "unknown node 'hh' (known: h)"


def test_targets_and_outputs_must_pair_up():
    spec = nodes(
        [
            {"name": "a", **dense(2), "in": "input"},
            {"name": "b", **dense(1), "in": "input"},
        ],
        outputs={"label": "a", "extra": "b"},
        targets={"label": "y", "value": "v"},
        loss="mse",
    )
    found = problems(spec)
    assert found["model.outputs.extra"] == (
        "output 'extra' has no target in data.targets (targets: label, value)"
    )
    assert found["data.targets.value"] == (
        "target 'value' has no output in model.outputs (outputs: label, extra)"
    )


def test_shapes_that_cannot_be_added_show_both_shapes():
    spec = nodes(
        [
            {"name": "a", **dense(64), "in": "input"},
            {"name": "b", **dense(32), "in": "input"},
            {"name": "out", "type": "add", "in": ["a", "b"]},
        ]
    )
    found = problems(spec)
    assert found["model.nodes[2]"] == (
        "add cannot take input (batch, 64) and (batch, 32): they do not broadcast "
        "(each dim must be equal, or 1)"
    )


def test_shapes_that_cannot_be_concatenated_show_both_shapes():
    spec = nodes(
        [{"name": "out", "type": "concat", "in": ["a", "b"], "dim": 1}],
        inputs={"a": "a", "b": "b"},
    )
    found = problems(spec, {"a": floats(3, 4), "b": floats(3, 5)})
    assert found["model.nodes[0]"] == (
        "concat cannot take input (batch, 3, 4) and (batch, 3, 5): all dims but dim 1 must match"
    )


def test_merge_needs_two_inputs_and_layers_one():
    spec = nodes(
        [
            {"name": "a", "type": "add", "in": "input"},
            {"name": "out", **dense(), "in": ["a", "input"]},
        ]
    )
    found = problems(spec)
    assert found["model.nodes[0].in"] == "add needs 2 or more inputs, found 1"
    assert found["model.nodes[1].in"] == "linear takes one input, found 2"


def test_duplicate_and_reserved_node_names():
    spec = nodes(
        [
            {"name": "h", **dense(), "in": "input"},
            {"name": "h", "type": "relu", "in": "input"},
            {"name": "keys", "type": "relu", "in": "h"},
            {"name": "out", **dense(1), "in": "keys"},
        ]
    )
    found = problems(spec)
    assert found["model.nodes[1].name"] == "duplicate node name 'h' (also model.nodes[0])"
    assert "'keys' is taken by torch" in found["model.nodes[2].name"]


def test_share_of_an_unknown_node():
    spec = nodes(
        [{"name": "out", "share": "hh", "in": "input"}, {"name": "h", **dense(), "in": "input"}]
    )
    found = problems(spec)
    assert found["model.nodes[0].share"].startswith("unknown node 'hh' (known: out, h)")


def test_share_of_itself():
    spec = nodes(
        [
            {"name": "a", "share": "b", "in": "input"},
            {"name": "b", "share": "a", "in": "input"},
            {"name": "out", "type": "add", "in": ["a", "b"]},
        ]
    )
    found = problems(spec)
    assert found["model.nodes[0].share"] == "node 'a' shares itself (a -> b -> a)"


def test_share_with_incompatible_input():
    spec = nodes(
        [
            {"name": "h", **dense(), "in": "a"},
            {"name": "h2", "share": "h", "in": "b"},
            {"name": "out", "type": "concat", "in": ["h", "h2"]},
        ],
        inputs={"a": "a", "b": "b"},
    )
    found = problems(spec, {"a": floats(128), "b": floats(64)})
    assert (
        found["model.nodes[1].share"] == "node 'h' takes input (batch, 128); 'h2' gets (batch, 64)"
    )


def test_share_with_its_own_arguments():
    spec = nodes(
        [
            {"name": "h", **dense(), "in": "input"},
            {"name": "h2", "share": "h", "in": "input", "out_features": 4, "init": "zeros"},
            {"name": "out", "type": "add", "in": ["h", "h2"]},
        ]
    )
    found = problems(spec)
    assert "remove out_features, init" in found["model.nodes[1]"]


def test_embedding_needs_integer_ids_from_a_model_input():
    emb = {"type": "embedding", "num_embeddings": 10, "embedding_dim": 4}
    found = problems(layers(emb), {"input": floats(6)})
    assert found["data.inputs"] == (
        "input 'input' feeds an embedding, which needs integer token ids; the field is float32"
    )
    found = problems(layers(dense(), emb), {"input": FieldInfo((6,), "int64")})
    assert "straight from a model input" in found["model.layers[1]"]
    found = problems(layers(emb), {"input": FieldInfo((6,), "int64", num_classes=20)})
    assert found["model.layers[0].num_embeddings"] == (
        "10 is too small: input 'input' holds ids up to 19"
    )


def test_model_larger_than_the_limit():
    found = problems(layers(dense(1000), dense(1000)), max_params=100_000)
    assert found == {"model": "1,018,000 parameters, more than the limit of 100,000"}


def test_default_parameter_limit_is_500_million():
    # counted on the meta device: nothing is allocated
    found = problems(layers(dense(30_000), dense(20_000)))
    assert found == {"model": "600,530,000 parameters, more than the limit of 500,000,000"}
    build_model(layers(dense(30_000), dense(10_000)), {"input": floats(16)})  # 300.5 million


def test_a_size_too_large_for_torch_is_one_line():
    found = problems(layers({"type": "linear", "out_features": 10**30}))
    assert found == {"model.layers[0]": "linear: a size is too large for torch (overflow)"}


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [
        ("p", float("nan"), "expected a finite number, found nan"),
        ("p", float("inf"), "expected a finite number, found inf"),
        ("p", 10**400, "expected a finite number, found 1000000000"),
    ],
)
def test_layer_numbers_must_be_finite(arg, value, message):
    found = problems(layers({"type": "dropout", arg: value}))
    assert list(found) == [f"model.layers[0].{arg}"]
    assert found[f"model.layers[0].{arg}"].startswith(message)


def test_spec_numbers_must_be_finite():
    with pytest.raises(SpecError) as caught:
        layers(dense(), training={"optimizer": {"weight_decay": float("inf")}})
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("training.optimizer.weight_decay", "input should be a finite number, found inf")
    ]
    # NaN is not JSON, but Python's parser takes it: the check at its place names it
    document = {
        "data": {"train": "t.npz", "inputs": "x", "targets": "y"},
        "model": {"layers": [{"type": "relu"}], "init": {"std": float("nan")}},
        "training": {"loss": "mse"},
    }
    text = json.dumps(document)
    assert '"std": NaN' in text
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("model.init.std", "input should be a finite number, found nan")
    ]


def test_input_with_an_empty_dimension():
    found = problems(layers(dense()), {"input": floats(0, 4)})
    assert found == {
        "data.inputs": "input 'input' has a dimension of size zero or below: (batch, 0, 4)"
    }


def test_bad_init():
    spec = make_spec(
        {
            "layers": [dense(), {"type": "batchnorm1d", "init": "kaiming_normal"}],
            "init": {"weight": "uniform", "a": 1, "b": 0, "bias": "orthogonal"},
        }
    )
    found = problems(spec)
    assert found["model.init"] == "uniform needs a < b; found a=1.0, b=0.0"
    assert "biases take default, zeros" in found["model.init.bias"]
    assert "kaiming_normal needs weights of 2 or more dims" in found["model.layers[1].init"]


# -------------------------------------------------- losses, metrics, monitors


def test_loss_that_does_not_fit_the_output():
    spec = layers(dense(1), loss="cross_entropy")
    found = problems(spec, targets={"output": FieldInfo((), "int64", 3)})
    assert list(found) == ["training.loss"]
    assert "cross_entropy needs at least 2 classes" in found["training.loss"]


def test_loss_that_does_not_fit_the_target():
    spec = layers(dense(3), loss="mse")
    found = problems(spec, targets={"output": floats(2)})
    assert "mse" in found["training.loss"] and "(batch, 2)" in found["training.loss"]


def two_outputs(**kwargs: Any):
    return nodes(
        [
            {"name": "a", **dense(3), "in": "input"},
            {"name": "b", **dense(1), "in": "input"},
        ],
        outputs={"label": "a", "value": "b"},
        targets={"label": "y", "value": "v"},
        **kwargs,
    )


def test_one_loss_for_several_outputs_says_which_output_it_does_not_fit():
    found = problems(two_outputs(loss="cross_entropy"))
    assert found == {
        "training.loss": "output 'value': cross_entropy needs at least 2 classes, found output "
        "(batch, 1); for a single logit use bce_with_logits"
    }


def test_loss_per_output_paths():
    found = problems(two_outputs(loss={"label": "mse", "value": "cross_entropy"}))
    assert list(found) == ["training.loss.value"]
    assert "cross_entropy" in found["training.loss.value"]


def test_loss_dict_must_cover_exactly_the_outputs():
    found = problems(two_outputs(loss={"label": "cross_entropy", "valeu": "mse"}))
    assert found["training.loss"] == "no loss for output 'value' (outputs: label, value)"
    assert found["training.loss.valeu"] == "unknown output 'valeu' (outputs: label, value)"


def test_metrics_for_unknown_outputs():
    spec = two_outputs(
        loss={"label": "cross_entropy", "value": "mse"},
        training={"metrics": {"labl": ["accuracy"], "value": ["mae"]}},
    )
    found = problems(spec)
    assert found == {"training.metrics.labl": "unknown output 'labl' (outputs: label, value)"}


def test_unknown_monitor_names_the_closest_metric():
    spec = make_spec(
        {"layers": [dense(3)]},
        loss="cross_entropy",
        training={"metrics": ["accuracy"]},
        callbacks={"checkpoint": {"monitor": "val_acc"}, "early_stopping": {"monitor": "val_loss"}},
        data={"validation": {"split": 0.2}},
    )
    found = problems(spec)
    assert list(found) == ["callbacks.checkpoint.monitor"]
    assert found["callbacks.checkpoint.monitor"].startswith(
        "unknown metric 'val_acc' (closest: val_accuracy"
    )


def test_val_monitor_without_validation_data():
    spec = make_spec(
        {"layers": [dense(3)]},
        loss="cross_entropy",
        training={"scheduler": {"type": "reduce_on_plateau"}},
    )
    found = problems(spec)
    assert "unknown metric 'val_loss'" in found["training.scheduler.monitor"]
    assert "need data.validation" in found["training.scheduler.monitor"]


def test_every_problem_is_reported_at_once():
    spec = nodes(
        [
            {"name": "c", "type": "conv2", "in": "input"},
            {"name": "d", **dense(), "in": "input", "bias": 1},
            {"name": "e", "type": "relu", "in": "nowhere"},
            {"name": "out", "type": "add", "in": ["d", "e"]},
        ],
        outputs="missing",
    )
    found = problems(spec)
    assert {
        "model.nodes[0].type",
        "model.nodes[1].bias",
        "model.nodes[2].in",
        "model.outputs",
    } <= set(found)
