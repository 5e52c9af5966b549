"""Spec + field shapes -> GraphModel: graph checks, shape inference on the meta device, summary.

Each distinct layer (type and arguments) is built once on the meta device, so
parameters are counted and torch checks the arguments without allocating
anything. Output shapes come from the layer's own rule where it is plain
(linear, activations, RNNs, ...), else from running the layer on meta tensors of
shape (2, *shape). All problems found are raised together as one SpecError, each
with the JSON path of the item at fault.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from worker.engine.errors import SpecError, SpecIssue, closest, did_you_mean
from worker.engine.fields import FieldInfo
from worker.engine.layers import (
    LayerDef,
    Shape,
    ShapeError,
    check_args,
    closest_types,
    resolve_type,
    same_value,
    show_shape,
)
from worker.engine.losses import loss_fit_error
from worker.engine.spec import InitSpec, JobSpec, LayerSpec, LossSpec, ReduceOnPlateauSpec

META_BATCH = 2
_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
_FAN_INITS = frozenset(
    {"kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal"}
)
# Node names become attribute names in GraphModel.layers (torch.export and
# load_state_dict reach modules by getattr), so they must not shadow these.
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))
_PLAIN_INITS = frozenset({"default", "zeros", "ones", "normal", "uniform"})


def per_sample(shape: tuple[int | None, ...]) -> tuple[int, ...]:
    """A summary shape without its batch dimension (the leading None)."""
    return tuple(d for d in shape[1:] if d is not None)


# ------------------------------------------------------------------- results


@dataclass
class SummaryRow:
    name: str
    type: str
    inputs: list[str]
    output_shape: tuple[int | None, ...]  # None is the batch dim
    params: int  # 0 for a node that shares another node's module
    shared_with: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "inputs": list(self.inputs),
            "output_shape": list(self.output_shape),
            "params": self.params,
            "shared_with": self.shared_with,
        }


@dataclass
class ModelSummary:
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    input_shapes: dict[str, tuple[int | None, ...]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.as_dict() for row in self.rows],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
        }

    def render(self) -> Table:
        """A Keras-like table: one row per model input and per node, params totalled below."""
        table = Table(
            caption=f"Total params: {self.total_params:,} (trainable: {self.trainable_params:,})",
            caption_justify="left",
        )
        for title in ("Node", "Type", "Input(s)", "Output shape"):
            table.add_column(title)
        table.add_column("Params", justify="right")
        for name, shape in self.input_shapes.items():
            table.add_row(name, "input", "", show_shape(per_sample(shape)), "0")
        for row in self.rows:
            kind = f"{row.type} (shares {row.shared_with})" if row.shared_with else row.type
            table.add_row(
                row.name,
                kind,
                ", ".join(row.inputs),
                show_shape(per_sample(row.output_shape)),
                f"{row.params:,}",
            )
        return table


class GraphModel(nn.Module):
    """Runs the nodes in a fixed topological order.

    `layers` holds each module once, under the name of the node that owns it, so
    the state dict has no duplicates (safetensors refuses shared tensors); a node
    with `share` runs its owner's module.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        steps: list[tuple[str, str, tuple[str, ...]]],
        input_names: list[str],
        outputs: dict[str, str],
    ):
        super().__init__()
        self.layers = nn.ModuleDict(modules)
        self.input_names = list(input_names)
        self.output_names = list(outputs)
        self._steps = steps  # (node, module key, input names)
        self._outputs = dict(outputs)

    def forward(self, *inputs: Tensor) -> Tensor | dict[str, Tensor]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)})"
            )
        values = dict(zip(self.input_names, inputs, strict=True))
        for name, key, sources in self._steps:
            values[name] = self.layers[key](*[values[s] for s in sources])
        if len(self._outputs) == 1:
            return values[next(iter(self._outputs.values()))]
        return {out: values[node] for out, node in self._outputs.items()}


@dataclass
class BuiltModel:
    """The model, its summary, and the dtypes and shapes the data must be fed as.

    `module` is built on first access: validation on the meta device needs only the
    rest, and building 10,000 modules would cost more than checking them.
    """

    summary: ModelSummary
    input_dtypes: dict[str, torch.dtype]
    output_shapes: dict[str, tuple[int, ...]]  # per sample, no batch dim
    make_module: Callable[[], GraphModel] = field(repr=False)

    @functools.cached_property
    def module(self) -> GraphModel:
        return self.make_module()


# ----------------------------------------------------------------- the build


@dataclass
class _Node:
    index: int
    path: str  # "model.nodes[3]"
    name: str
    item: LayerSpec
    inputs: list[str]
    in_paths: list[str]  # where each input is named, for errors
    share: str | None = None
    layer: LayerDef | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    claimed: dict[str, Any] = field(default_factory=dict)  # inferred args the user wrote
    owner: _Node | None = None  # the node whose module this one runs
    args_ok: bool = True  # its arguments passed check_args


@dataclass
class _Made:
    """An owner's module as checked: its arguments, and the use it was first built for."""

    layer: LayerDef
    kwargs: dict[str, Any]  # written and inferred arguments together
    inferred: dict[str, Any]
    node: _Node
    shapes: list[Shape]
    key: Hashable  # the layer and its arguments: one meta prototype per key


def build_model(
    spec: JobSpec,
    inputs: dict[str, FieldInfo],
    targets: dict[str, FieldInfo] | None = None,
    *,
    device: str | torch.device = "meta",
    max_params: int | None = 500_000_000,
) -> BuiltModel:
    """Check the spec's model against the data shapes and build it.

    On the meta device nothing is allocated (validation). On a real device the
    weights are initialised on the CPU under `spec.seed`, then moved. `targets`
    may be None (no dataset at hand): target-dependent checks are then skipped.
    `max_params` None: no size limit (the spec was checked against one already).
    Raises SpecError listing every problem found.
    """
    return _Builder(spec, inputs, targets, max_params).build(torch.device(device))


class _Builder:
    def __init__(
        self,
        spec: JobSpec,
        fields: dict[str, FieldInfo],
        targets: dict[str, FieldInfo] | None,
        max_params: int | None,
    ):
        self.spec = spec
        self.fields = fields
        self.targets = targets
        self.max_params = max_params
        self.issues: list[SpecIssue] = []
        self.input_names = list(spec.data.input_fields())
        self.target_names = list(spec.data.target_fields())
        self.nodes: list[_Node] = []
        self.by_name: dict[str, _Node] = {}
        self.outputs: dict[str, str] = {}  # output name -> node name
        self.order: list[_Node] = []
        self.shapes: dict[str, Shape] = {}
        self.made: dict[str, _Made] = {}  # owner node name -> its module
        self.failed: set[str] = set()  # owners whose module could not be built
        # Deep models repeat a few blocks: build and run each distinct layer once.
        self.prototypes: dict[Hashable, nn.Module | str] = {}  # a module, or why it failed
        self.runs: dict[Hashable, Shape | str] = {}  # output shape, or why it failed

    def error(self, path: str, message: str) -> None:
        self.issues.append(SpecIssue(path, message))

    def build(self, device: torch.device) -> BuiltModel:
        for name in self.input_names:
            if name not in self.fields:
                self.error(self._input_path(name), f"no field information for input '{name}'")
            elif any(d <= 0 for d in self.fields[name].shape):
                self.error(
                    self._input_path(name),
                    f"input '{name}' has a dimension of size zero or below: "
                    f"{show_shape(tuple(self.fields[name].shape))}",
                )
        if self.issues:
            raise SpecError(self.issues)
        self.shapes = {name: tuple(self.fields[name].shape) for name in self.input_names}
        self._check_init(self.spec.model.init, "model.init")
        if self.spec.model.is_graph:
            self._collect_graph()
        else:
            self._collect_sequential()
        self._check_nodes()
        self._order()
        for node in self.order:
            self._infer(node)
        input_dtypes = self._input_dtypes()
        self._check_unused()
        total = sum(self._params(made) for made in self.made.values())
        if self.max_params is not None and total > self.max_params:
            self.error("model", f"{total:,} parameters, more than the limit of {self.max_params:,}")
        output_shapes = {
            out: self.shapes[node] for out, node in self.outputs.items() if node in self.shapes
        }
        self._check_training(output_shapes)
        if self.issues:
            raise SpecError(self.issues)

        steps = [(n.name, n.owner.name, tuple(n.inputs)) for n in self.order if n.owner]

        def make_module() -> GraphModel:
            model = GraphModel(self._modules(device), steps, self.input_names, self.outputs)
            return model if device.type == "meta" else model.to(device)

        built = BuiltModel(self._summary(total), input_dtypes, output_shapes, make_module)
        if device.type != "meta":
            built.module  # noqa: B018  (real weights are wanted now, not on first use)
        return built

    # ---------------------------------------------------------- the node list

    def _collect_sequential(self) -> None:
        layers = self.spec.model.layers or []
        if len(self.input_names) > 1 or len(self.target_names) > 1:
            self.error(
                "model.layers",
                f"a Sequential model ('layers') has one input and one output, but the data names "
                f"{len(self.input_names)} inputs and {len(self.target_names)} targets; "
                "use 'nodes' and 'outputs'",
            )
            return
        taken = {item.name for item in layers if item.name} | set(self.input_names)
        counts: dict[str, int] = {}
        previous = self.input_names[0]
        for index, item in enumerate(layers):
            path = f"model.layers[{index}]"
            for key in ("in", "share"):
                if key in (item.model_extra or {}):
                    self.error(
                        f"{path}.{key}",
                        f"'{key}' belongs to graph models ('nodes'); layers run in order",
                    )
            layer = self._resolve(item, path, merge_ok=False)
            name = item.name or _auto_name(layer.name if layer else "layer", counts, taken)
            node = _Node(index, path, name, item, [previous], [path], layer=layer)
            self.nodes.append(node)
            previous = name
        self.outputs = {self.target_names[0]: previous}

    def _collect_graph(self) -> None:
        for index, item in enumerate(self.spec.model.nodes or []):
            path = f"model.nodes[{index}]"
            in_paths = (
                [f"{path}.in"]
                if isinstance(item.in_, str)
                else [f"{path}.in[{k}]" for k in range(len(item.inputs))]
            )
            layer = None if item.share else self._resolve(item, path, merge_ok=True)
            self.nodes.append(
                _Node(index, path, item.name, item, item.inputs, in_paths, item.share, layer)
            )

    def _resolve(self, item: LayerSpec, path: str, *, merge_ok: bool) -> LayerDef | None:
        if item.type is None:
            self.error(f"{path}.type", "missing (required)")
            return None
        layer = resolve_type(item.type)
        if layer is None:
            near = closest_types(item.type, merge_ops=merge_ok)
            hint = f"closest: {', '.join(near)}" if near else "the job schema lists the layer types"
            self.error(f"{path}.type", f"unknown layer type '{item.type}' ({hint})")
        elif layer.is_merge and not merge_ok:
            self.error(
                f"{path}.type", f"{layer.name} merges several inputs; use a graph model ('nodes')"
            )
            return None
        return layer

    def _check_nodes(self) -> None:
        """Arguments, names, references, shares and outputs: everything but shapes."""
        for node in self.nodes:
            if node.name in self.by_name:
                other = self.by_name[node.name]
                self.error(
                    f"{node.path}.name", f"duplicate node name '{node.name}' (also {other.path})"
                )
                continue
            if node.name in self.shapes:
                self.error(
                    f"{node.path}.name", f"'{node.name}' is already the name of a model input"
                )
                continue
            if node.name in _RESERVED_NAMES:
                self.error(
                    f"{node.path}.name",
                    f"'{node.name}' is taken by torch (an attribute of nn.ModuleDict); "
                    "choose another name",
                )
            self.by_name[node.name] = node
        for node in self.nodes:
            if node.item.init is not None and not node.share:
                self._check_init(node.item.init, f"{node.path}.init")
            if node.layer is not None:
                node.kwargs, node.claimed, problems = check_args(node.layer, node.item.kwargs)
                for arg, message in problems:
                    self.error(f"{node.path}.{arg}", message)
                node.args_ok = not problems
                self._check_input_count(node)
                node.owner = node
            for source, path in zip(node.inputs, node.in_paths, strict=True):
                if source not in self.by_name and source not in self.shapes:
                    self.error(path, f"unknown node '{source}' ({self._known(source)})")
        for node in self.nodes:
            if node.share:
                self._resolve_share(node)
        if self.spec.model.is_graph:
            self._collect_outputs()
        self._match_targets()

    def _check_input_count(self, node: _Node) -> None:
        layer = node.layer
        assert layer is not None
        count = len(node.inputs)
        if layer.is_merge and count < 2:
            self.error(f"{node.path}.in", f"{layer.name} needs 2 or more inputs, found {count}")
        elif layer.inputs is not None and count != layer.inputs:
            wanted = "one input" if layer.inputs == 1 else f"{layer.inputs} inputs"
            self.error(f"{node.path}.in", f"{layer.name} takes {wanted}, found {count}")

    def _resolve_share(self, node: _Node) -> None:
        path = f"{node.path}.share"
        extra = list(node.item.kwargs) + (["init"] if node.item.init is not None else [])
        if extra:
            self.error(
                node.path,
                f"'share' reuses node '{node.share}' as it is (module, arguments and init); "
                f"remove {', '.join(extra)}",
            )
        seen = {node.name: None}  # a dict: ordered, for the message
        target = node
        while target.share:
            if target.share not in self.by_name:
                self.error(
                    path,
                    f"unknown node '{target.share}' ({self._known(target.share, inputs=False)})",
                )
                return
            if target.share in seen:
                self.error(
                    path, f"node '{node.name}' shares itself ({' -> '.join([*seen, target.share])})"
                )
                return
            seen[target.share] = None
            target = self.by_name[target.share]
        if target.layer is None:
            return  # the owner's own error is reported already
        node.layer, node.owner = target.layer, target
        self._check_input_count(node)

    def _collect_outputs(self) -> None:
        outputs = self.spec.model.outputs
        named = self.spec.model.output_nodes()
        if isinstance(outputs, str) and len(self.target_names) == 1:
            named = {self.target_names[0]: outputs}  # one output takes the one target's name
        elif isinstance(outputs, str):
            self.error(
                "model.outputs",
                f"one output node, but data.targets names {len(self.target_names)} targets "
                f"({', '.join(self.target_names)}); map each to a node: "
                f'{{"{self.target_names[0]}": node, ...}}',
            )
            return
        for out, node_name in named.items():
            path = "model.outputs" if isinstance(outputs, str) else f"model.outputs.{out}"
            if node_name in self.shapes:
                self.error(path, f"'{node_name}' is a model input; an output must be a node")
            elif node_name not in self.by_name:
                self.error(
                    path, f"unknown node '{node_name}' ({self._known(node_name, inputs=False)})"
                )
            else:
                self.outputs[out] = node_name

    def _match_targets(self) -> None:
        if not self.spec.model.is_graph or isinstance(self.spec.model.outputs, str):
            return  # a single output is named after the single target
        outputs = self.spec.model.output_nodes()
        single = self.spec.data.single_output
        for out in outputs:
            if out not in self.target_names:
                targets = ", ".join(self.target_names)
                self.error(
                    f"model.outputs.{out}",
                    f"output '{out}' has no target in data.targets (targets: {targets})",
                )
        for target in self.target_names:
            if target not in outputs:
                self.error(
                    "data.targets" if single else f"data.targets.{target}",
                    f"target '{target}' has no output in model.outputs "
                    f"(outputs: {', '.join(outputs)})",
                )

    def _known(self, name: str, *, inputs: bool = True) -> str:
        names = [*(self.input_names if inputs else []), *self.by_name]
        if len(names) <= 12:
            return f"known: {', '.join(names)}"
        near = closest(name, names)
        return f"closest: {', '.join(near)}" if near else f"{len(names)} names known, none close"

    # -------------------------------------------------------------- ordering

    def _order(self) -> None:
        """Topological order (Kahn), ties in spec order; every cycle found is an error."""
        waiting = {n.name: 0 for n in self.nodes if self.by_name.get(n.name) is n}
        consumers: dict[str, list[_Node]] = {}
        for name in waiting:
            for source in set(self.by_name[name].inputs):
                if source in waiting:
                    waiting[name] += 1
                    consumers.setdefault(source, []).append(self.by_name[name])
        ready = deque(self.by_name[name] for name, count in waiting.items() if count == 0)
        while ready:
            node = ready.popleft()
            self.order.append(node)
            for consumer in consumers.get(node.name, []):
                waiting[consumer.name] -= 1
                if waiting[consumer.name] == 0:
                    ready.append(consumer)
        stuck = {name for name, count in waiting.items() if count > 0}
        done: set[str] = set()
        for start in [n.name for n in self.nodes if n.name in stuck]:
            walk: list[str] = []
            name = start
            while name not in done and name not in walk:
                walk.append(name)
                name = next(s for s in self.by_name[name].inputs if s in stuck)
            if name in walk:
                # the walk follows inputs, against the data flow; turn it round to read a -> b -> a
                loop = walk[walk.index(name) :]
                cycle = [name, *reversed(loop[1:]), name]
                self.error("model.nodes", f"cycle {' -> '.join(cycle)}")
            done.update(walk)

    # ------------------------------------------------------- shape inference

    def _infer(self, node: _Node) -> None:
        layer, owner = node.layer, node.owner
        if layer is None or owner is None or not owner.args_ok or owner.name in self.failed:
            return
        if any(source not in self.shapes for source in node.inputs):
            return  # an upstream node failed and said so
        shapes = [self.shapes[source] for source in node.inputs]
        shown = " and ".join(show_shape(s) for s in shapes)
        try:
            inferred = layer.check_input(shapes, owner.kwargs)
        except Exception as exc:  # ShapeError, or a rule tripping on an odd shape
            reason = str(exc) if isinstance(exc, ShapeError) else _torch_message(exc)
            self.error(node.path, f"{layer.name} cannot take input {shown}: {reason}")
            return
        for arg, written in node.claimed.items():
            if not same_value(written, inferred[arg]):
                self.error(
                    f"{node.path}.{arg}",
                    f"{arg} is inferred from the input ({inferred[arg]}); found {written!r}",
                )
        made = self.made.get(owner.name)
        if made is None:
            made = self._make(node, layer, inferred, shapes)
            if made is None:
                return
        elif made.inferred != inferred:
            self._share_mismatch(node, made, shown)
            return
        self._output(node, made, shapes, shown)

    def _make(
        self, node: _Node, layer: LayerDef, inferred: dict[str, Any], shapes: list[Shape]
    ) -> _Made | None:
        owner = node.owner
        assert owner is not None
        kwargs = {**owner.kwargs, **inferred}
        key = (layer.name, _freeze(kwargs))
        if key not in self.prototypes:
            try:
                with torch.device("meta"):
                    self.prototypes[key] = layer.factory(**kwargs)
            except Exception as exc:  # torch raises many types; the user needs one line
                self.prototypes[key] = _torch_message(exc)
        module = self.prototypes[key]
        if isinstance(module, str):
            self.error(owner.path, f"{layer.name}: {module}")
            self.failed.add(owner.name)
            return None
        made = _Made(layer, kwargs, inferred, node, shapes, key)
        self.made[owner.name] = made
        init = owner.item.init
        if init is not None and init.weight in _FAN_INITS:
            weights = [p for n, p in module.named_parameters() if "weight" in n]
            if weights and all(p.dim() < 2 for p in weights):
                self.error(
                    f"{owner.path}.init",
                    f"{init.weight} needs weights of 2 or more dims; {layer.name} has only 1-d "
                    "weights (use zeros, ones, normal or uniform)",
                )
        return made

    def _params(self, made: _Made) -> int:
        module = self.prototypes[made.key]
        assert isinstance(module, nn.Module)
        return sum(p.numel() for p in module.parameters())

    def _share_mismatch(self, node: _Node, made: _Made, shown: str) -> None:
        first = " and ".join(show_shape(s) for s in made.shapes)
        if node.share:
            owner = node.owner
            assert owner is not None
            self.error(
                f"{node.path}.share",
                f"node '{owner.name}' takes input {first}; '{node.name}' gets {shown}",
            )
        else:  # a node that shares this one came first in the order and built the module
            self.error(
                f"{node.path}.in",
                f"'{node.name}' gets input {shown}, but '{made.node.name}', which shares its "
                f"module, takes {first}",
            )

    def _output(self, node: _Node, made: _Made, shapes: list[Shape], shown: str) -> None:
        layer = made.layer
        run_key = (made.key, tuple(shapes))
        if run_key not in self.runs:
            self.runs[run_key] = self._output_shape(made, shapes)
        shape = self.runs[run_key]
        if isinstance(shape, str):
            self.error(node.path, f"{layer.name} cannot take input {shown}: {shape}")
        elif any(d <= 0 for d in shape):
            self.error(
                node.path,
                f"{layer.name} cannot take input {shown}: a dimension goes to zero or below "
                f"(output {show_shape(shape)})",
            )
        else:
            self.shapes[node.name] = shape

    def _output_shape(self, made: _Made, shapes: list[Shape]) -> Shape | str:
        """The layer's rule where it has one, else what torch gives on meta tensors."""
        layer = made.layer
        try:
            if layer.output is not None:
                return tuple(layer.output(shapes, made.kwargs))
            dtype = torch.long if layer.integer_input else torch.float32
            args = [torch.empty((META_BATCH, *s), device="meta", dtype=dtype) for s in shapes]
            with torch.no_grad():
                out = self.prototypes[made.key](*args)  # type: ignore[operator]
        except Exception as exc:  # torch raises many types; the user needs one line
            return _torch_message(exc)
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != META_BATCH:
            return "its output does not keep the batch dim first"
        return tuple(out.shape[1:])

    # --------------------------------------------------- inputs and outputs

    def _input_path(self, name: str) -> str:
        return "data.inputs" if self.spec.data.single_input else f"data.inputs.{name}"

    def _input_dtypes(self) -> dict[str, torch.dtype]:
        """Token ids stay integers for embeddings; everything else is fed as float32."""
        users: dict[str, list[_Node]] = {name: [] for name in self.input_names}
        for node in self.nodes:
            for source in node.inputs:
                if source in users and node.layer is not None:
                    users[source].append(node)
        dtypes = {}
        for name, nodes in users.items():
            embeddings = [n for n in nodes if n.layer and n.layer.integer_input]
            others = [n for n in nodes if n.layer and not n.layer.integer_input]
            dtypes[name] = torch.long if embeddings and not others else torch.float32
            field_ = self.fields[name]
            if embeddings and others:
                self.error(
                    embeddings[0].in_paths[embeddings[0].inputs.index(name)],
                    f"embedding needs integer token ids, but input '{name}' also feeds "
                    f"'{others[0].name}' ({others[0].layer.name}), so it is fed as float32; "  # type: ignore[union-attr]
                    "give the embedding an input of its own",
                )
            elif embeddings and not field_.is_integer:
                self.error(
                    self._input_path(name),
                    f"input '{name}' feeds an embedding, which needs integer token ids; "
                    f"the field is {field_.dtype}",
                )
            elif embeddings and field_.num_classes is not None:
                for node in embeddings:
                    owner = node.owner or node
                    size = owner.kwargs.get("num_embeddings")
                    if isinstance(size, int) and field_.num_classes > size:
                        self.error(
                            f"{owner.path}.num_embeddings",
                            f"{size} is too small: input '{name}' holds ids "
                            f"up to {field_.num_classes - 1}",
                        )
        for node in self.nodes:
            if node.layer is not None and node.layer.integer_input:
                for source, path in zip(node.inputs, node.in_paths, strict=True):
                    if source in self.by_name:
                        self.error(
                            path,
                            f"embedding takes integer token ids straight from a model input; "
                            f"'{source}' is the (float) output of a node",
                        )
        return dtypes

    def _check_unused(self) -> None:
        used = {source for node in self.nodes for source in node.inputs} | set(
            self.outputs.values()
        )
        for name in self.input_names:
            if name not in used:
                self.error(self._input_path(name), f"input '{name}' is not used by any node")
        if self.spec.model.is_graph and self.outputs:
            for node in self.nodes:
                if node.name not in used and self.by_name.get(node.name) is node:
                    self.error(node.path, f"node '{node.name}' is not used by any node or output")

    # ------------------------------------------------------- losses, metrics

    def _check_training(self, output_shapes: dict[str, Shape]) -> None:
        training = self.spec.training
        outputs = self.target_names
        listed = ", ".join(outputs)
        single_loss = isinstance(training.loss, LossSpec)
        if not single_loss:
            for name in outputs:
                if name not in training.loss:
                    self.error("training.loss", f"no loss for output '{name}' (outputs: {listed})")
            for name in training.loss:
                if name not in outputs:
                    self.error(
                        f"training.loss.{name}", f"unknown output '{name}' (outputs: {listed})"
                    )
        losses = training.losses(outputs)
        for name in outputs:
            loss, shape = losses.get(name), output_shapes.get(name)
            if loss is None or shape is None:
                continue
            target = self.targets.get(name) if self.targets is not None else None
            problem = loss_fit_error(loss, shape, target)
            if problem:
                path = "training.loss" if single_loss else f"training.loss.{name}"
                prefix = f"output '{name}': " if single_loss and len(outputs) > 1 else ""
                self.error(path, prefix + problem)
        self._check_metrics(outputs, losses, output_shapes)
        self._check_monitors()

    def _check_metrics(
        self, outputs: list[str], losses: dict[str, LossSpec], output_shapes: dict[str, Shape]
    ) -> None:
        from worker.engine.metrics import metric_fit_error  # lazy, as in _check_monitors

        metrics = self.spec.training.metrics
        if isinstance(metrics, dict):
            for name in metrics:
                if name not in outputs:
                    self.error(
                        f"training.metrics.{name}",
                        f"unknown output '{name}' (outputs: {', '.join(outputs)})",
                    )
        for name in outputs:
            listed = metrics if isinstance(metrics, list) else metrics.get(name, [])
            base = "training.metrics" if isinstance(metrics, list) else f"training.metrics.{name}"
            prefix = f"output '{name}': " if isinstance(metrics, list) and len(outputs) > 1 else ""
            loss = losses.get(name)
            if loss is None:
                continue
            for index, metric in enumerate(listed):
                problem = metric_fit_error(metric, loss, output_shapes.get(name))
                if problem:
                    self.error(f"{base}[{index}]", prefix + problem)

    def _check_monitors(self) -> None:
        # Lazy, so that building needs worker.engine.metrics only when there is a spec to check.
        from worker.engine.metrics import metric_names

        try:
            names = metric_names(self.spec)
        except ValueError:
            return  # a missing loss, reported above
        callbacks, scheduler = self.spec.callbacks, self.spec.training.scheduler
        monitors = [
            ("callbacks.checkpoint.monitor", callbacks.checkpoint and callbacks.checkpoint.monitor),
            (
                "callbacks.early_stopping.monitor",
                callbacks.early_stopping and callbacks.early_stopping.monitor,
            ),
            (
                "training.scheduler.monitor",
                scheduler.monitor if isinstance(scheduler, ReduceOnPlateauSpec) else None,
            ),
        ]
        for path, monitor in monitors:
            if monitor and monitor not in names:
                hint = did_you_mean(monitor, names)
                if monitor.startswith("val_") and self.spec.data.validation is None:
                    hint += "; val_ metrics need data.validation"
                self.error(path, f"unknown metric '{monitor}'{hint}")

    def _check_init(self, init: InitSpec, path: str) -> None:
        if init.bias not in _PLAIN_INITS:
            self.error(
                f"{path}.bias",
                f"biases take default, zeros, ones, normal or uniform; found '{init.bias}'",
            )
        if "uniform" in (init.weight, init.bias) and init.a >= init.b:
            self.error(path, f"uniform needs a < b; found a={init.a}, b={init.b}")

    # ----------------------------------------------------- real weights, summary

    def _modules(self, device: torch.device) -> dict[str, nn.Module]:
        """One module per owner node, in spec order: on meta as they are, else on the CPU
        from the seed and initialised."""
        owners = [(node, self.made[node.name]) for node in self.nodes if node.name in self.made]
        if device.type == "meta":
            with torch.device("meta"):
                return {node.name: made.layer.factory(**made.kwargs) for node, made in owners}
        modules: dict[str, nn.Module] = {}
        # fork_rng(devices=[]) with the CPU generator alone: the caller's RNG streams,
        # CPU and CUDA, are the same after building as before.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.random.default_generator.manual_seed(self.spec.seed)
            for node, made in owners:
                module = made.layer.factory(**made.kwargs)
                own = node.item.init
                _initialize(module, own or self.spec.model.init, own=own is not None)
                modules[node.name] = module
        return modules

    def _summary(self, total: int) -> ModelSummary:
        rows = []
        for node in self.order:
            if node.owner is None or node.name not in self.shapes:
                continue
            shared = node.owner is not node
            rows.append(
                SummaryRow(
                    node.name,
                    node.owner.layer.name if node.owner.layer else "?",
                    list(node.inputs),
                    (None, *self.shapes[node.name]),
                    0 if shared else self._params(self.made[node.name]),
                    node.owner.name if shared else None,
                )
            )
        sizes = [
            p.numel()
            for made in self.made.values()
            for p in self.prototypes[made.key].parameters()  # type: ignore[union-attr]
            if p.requires_grad
        ]
        trainable = sum(sizes)
        input_shapes = {name: (None, *self.fields[name].shape) for name in self.input_names}
        return ModelSummary(rows, total, trainable, input_shapes)


# ------------------------------------------------------------------- helpers


def _auto_name(base: str, counts: dict[str, int], taken: set[str]) -> str:
    """Keras names: conv2d, conv2d_1, conv2d_2, ... skipping names already taken."""
    while True:
        count = counts.get(base, 0)
        counts[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        if name not in taken:
            taken.add(name)
            return name


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _torch_message(exc: BaseException) -> str:
    """One line from a torch exception, with the commonest shape errors put plainly."""
    text = str(exc).strip()
    match = re.search(r"input size per channel: \(([^)]*)\)\. Kernel size: \(([^)]*)\)", text)
    if match:
        return (
            f"kernel size ({_dims(match[2])}) is larger than the input ({_dims(match[1])}, "
            "after padding)"
        )
    match = re.search(r"Calculated output size: \(([^)]*)\)", text)
    if match and "too small" in text:
        dims = tuple(int(d) for d in _dims(match[1]).split(", "))
        return f"a dimension goes to zero or below (output {show_shape(dims)})"
    if "Invalid computed output size" in text:
        return "a dimension goes to zero or below"
    if isinstance(exc, OverflowError) or "overflow" in text.lower():
        return "a size is too large for torch (overflow)"
    first = text.splitlines()[0].strip() if text else ""
    return first.rstrip(".") or type(exc).__name__


def _dims(text: str) -> str:
    return ", ".join(part.strip() for part in re.split(r"x", text))


_INITIALIZERS = {
    "kaiming_normal": lambda t, s: nn.init.kaiming_normal_(t, nonlinearity=s.nonlinearity),
    "kaiming_uniform": lambda t, s: nn.init.kaiming_uniform_(t, nonlinearity=s.nonlinearity),
    "xavier_normal": lambda t, s: nn.init.xavier_normal_(t, gain=s.gain or 1.0),
    "xavier_uniform": lambda t, s: nn.init.xavier_uniform_(t, gain=s.gain or 1.0),
    "orthogonal": lambda t, s: nn.init.orthogonal_(t, gain=s.gain or 1.0),
    "normal": lambda t, s: nn.init.normal_(t, mean=s.mean, std=s.std),
    "uniform": lambda t, s: nn.init.uniform_(t, a=s.a, b=s.b),
    "zeros": lambda t, s: nn.init.zeros_(t),
    "ones": lambda t, s: nn.init.ones_(t),
}


def _initialize(module: nn.Module, init: InitSpec, *, own: bool) -> None:
    """Apply `init` to weights of 2+ dims (and biases); norm layers keep torch's init
    unless the init is the layer's own."""
    weights = init.weight != "default"
    biases = init.bias != "default" and (weights or "bias" in init.model_fields_set)
    if not (weights or biases):
        return
    for sub in module.modules():
        if isinstance(sub, _NORMS) and not (own and sub is module):
            continue
        for name, param in sub.named_parameters(recurse=False):
            if "weight" in name:
                # 1-d weights (norm scales, prelu slopes) only take a plain init given to the layer
                if weights and (param.dim() >= 2 or (own and init.weight in _PLAIN_INITS)):
                    _INITIALIZERS[init.weight](param, init)
            elif "bias" in name and biases:
                _INITIALIZERS[init.bias](param, init)
        if isinstance(sub, nn.Embedding) and sub.padding_idx is not None and weights:
            with torch.no_grad():
                sub.weight[sub.padding_idx].zero_()
