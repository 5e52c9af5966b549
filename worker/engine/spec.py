"""The job spec: one pydantic model for a whole training job.

This module is the contract users write against. It checks the shape of the
document (types, ranges, names); whether the model graph, the shapes and the
loss fit together is checked by `worker.engine.build`, which reports errors with the
same JSON paths (`model.nodes[3].in`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.engine.errors import SpecError, SpecIssue

# `deterministic: true` on a GPU: cuBLAS is deterministic only with a fixed workspace
# (PyTorch's reproducibility notes), read once, when cuBLAS first starts in a process.
# Here, not in devices.py, so the worker parent (worker/gpus.py) reads it without torch.
CUBLAS_WORKSPACE = ":4096:8"

MAX_NODES = 10_000
MAX_NAME_LENGTH = 64
# Job metadata (the service stores, lists and filters by it; training ignores it).
MAX_LABEL_LENGTH = 64  # a project or a tag
MAX_TAGS = 32
MAX_NOTE_LENGTH = 10_000
LABEL_CHARACTERS = "letters a-z A-Z, digits, and - _ . : / and space"
_LABEL_EXTRA = frozenset("-_.:/ ")

InitName = Literal[
    "default",
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "orthogonal",
    "normal",
    "uniform",
    "zeros",
    "ones",
]


def _json_kind(value: Any) -> str:
    """Pick a union branch by the JSON type of the value, so errors come from one branch only."""
    if isinstance(value, dict):
        return "typed" if "type" in value else "object"
    if isinstance(value, list | tuple):
        return "list"
    return "scalar"


def by_kind(**branches: Any) -> Any:
    """`Annotated[A | B, ...]` that dispatches on JSON type: by_kind(scalar=str, object=X)."""
    members = tuple(Annotated[tp, Tag(kind)] for kind, tp in branches.items())
    default = next(iter(branches))

    def pick(value: Any) -> str:
        kind = _json_kind(value)
        if kind == "typed" and kind not in branches:
            kind = "object"
        return kind if kind in branches else default

    return Annotated[Union[members], Discriminator(pick)]  # noqa: UP007


class Strict(BaseModel):
    """Base for spec sections: unknown keys are errors, not silently ignored; numbers are finite
    (NaN and Infinity are not JSON, though Python's parser takes them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------- data


class SplitSpec(Strict):
    """Hold out a seeded random fraction of the training file for validation."""

    split: float = Field(gt=0.0, lt=1.0, description="Fraction of training rows held out.")


FieldRef = by_kind(scalar=str, list=list[str])


class DataSpec(Strict):
    train: str = Field(
        min_length=1,
        description="Dataset id (service) or a local file path (local runs): .npz .npy .csv .parquet",
    )
    validation: by_kind(scalar=str, object=SplitSpec) | None = Field(  # type: ignore[valid-type]
        default=None, description="A dataset id/path, or {'split': fraction} of the training data."
    )
    inputs: by_kind(scalar=str, list=list[str], object=dict[str, FieldRef]) = Field(  # type: ignore[valid-type]
        description="Model inputs: one field (one input) or {input_name: field(s)}."
    )
    targets: by_kind(scalar=str, list=list[str], object=dict[str, FieldRef]) = Field(  # type: ignore[valid-type]
        description="Targets: one field (one output) or {output_name: field(s)}."
    )
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = Field(default=0, ge=0, le=64)
    in_memory: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Hold the dataset as tensors and batch by index (fast) or stream through a "
        "DataLoader. 'auto' holds it when it fits the memory budget.",
    )
    # The names a single input field and a single target field go by: 'input' and
    # 'output', unless the model names its one input or output otherwise (set by
    # JobSpec, which sees the model; see `single_field_names`).
    _input_name: str = PrivateAttr(default="input")
    _output_name: str = PrivateAttr(default="output")

    @field_validator("inputs", "targets")
    @classmethod
    def _names_not_empty(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                raise ValueError("must name at least one field")
            for key in value:
                _check_name(key)
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one column")
        return value

    def input_fields(self) -> dict[str, str | list[str]]:
        """Model input name -> dataset field(s). A single field is the model's one input,
        whatever the graph calls it ('input' by default)."""
        return _as_named(self.inputs, self._input_name)

    def target_fields(self) -> dict[str, str | list[str]]:
        """Model output name -> dataset field(s). A single field is the model's one output,
        whatever `model.outputs` calls it ('output' by default)."""
        return _as_named(self.targets, self._output_name)

    @property
    def single_input(self) -> bool:
        return not isinstance(self.inputs, dict)

    @property
    def single_output(self) -> bool:
        return not isinstance(self.targets, dict)


def _as_named(value: str | list[str] | dict[str, Any], default: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    return {default: value}


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"name must be 1 to {MAX_NAME_LENGTH} characters, found {name!r}")
    if not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(
            f"name must be letters, digits and '_' (not starting with a digit), found {name!r}"
        )
    return name


def check_label(value: str) -> str:
    """A project or tag name: 1 to 64 ASCII letters, digits and `-_.:/ `, not starting or
    ending with a space. ASCII, so case-insensitive matching and sorting are the same on
    every database; no commas, so a list of tags can be written comma-separated."""
    if not value or len(value) > MAX_LABEL_LENGTH:
        raise ValueError(f"must be 1 to {MAX_LABEL_LENGTH} characters, found {value!r}")
    bad = sorted({c for c in value if not (c.isascii() and c.isalnum()) and c not in _LABEL_EXTRA})
    if bad:
        raise ValueError(f"may hold only {LABEL_CHARACTERS}; found {''.join(bad)!r} in {value!r}")
    if value[0] == " " or value[-1] == " ":
        raise ValueError(f"must not start or end with a space, found {value!r}")
    return value


def check_tags(tags: list[str]) -> list[str]:
    """Tags in the order given, each once (a repeated tag is the same tag)."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags, found {len(tags)}")
    return list(dict.fromkeys(tags))


def check_note(note: str) -> str:
    if len(note) > MAX_NOTE_LENGTH:
        raise ValueError(f"at most {MAX_NOTE_LENGTH:,} characters, found {len(note):,}")
    if "\x00" in note:
        raise ValueError("contains a NUL character (\\u0000)")
    return note


Label = Annotated[str, AfterValidator(check_label)]
Tags = Annotated[list[Label], AfterValidator(check_tags)]
Note = Annotated[str, AfterValidator(check_note)]


# -------------------------------------------------------------------- model


class InitSpec(Strict):
    """Weight initialisation. A bare string means {'weight': <string>}."""

    weight: InitName = "default"
    bias: InitName = Field(
        default="zeros",
        description="Bias init when a weight init is set; 'default' keeps torch's.",
    )
    nonlinearity: Literal["relu", "leaky_relu", "tanh", "sigmoid", "linear", "selu"] = "relu"
    gain: float | None = Field(default=None, gt=0, description="xavier/orthogonal gain")
    std: float = Field(default=0.02, gt=0, description="normal init standard deviation")
    mean: float = 0.0
    a: float = Field(default=-0.05, description="uniform init lower bound")
    b: float = Field(default=0.05, description="uniform init upper bound")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"weight": value}
        return value


class LayerSpec(BaseModel):
    """One layer: `type` plus the keyword arguments of that torch.nn class.

    Arguments are checked against the layer allowlist by `worker.engine.build`
    (unknown, missing, wrongly typed), so the errors can name the exact path.
    """

    model_config = ConfigDict(extra="allow")

    type: str | None = Field(default=None, description="Layer type, case-insensitive.")
    name: str | None = Field(
        default=None, description="Node name (graph models; optional in layers)."
    )
    init: InitSpec | None = Field(default=None, description="Overrides model.init for this layer.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The layer's own arguments (everything but our reserved keys)."""
        extra = dict(self.model_extra or {})
        for key in ("in", "share"):
            extra.pop(key, None)
        return extra


class NodeSpec(LayerSpec):
    """A node of a graph model: a layer (or merge op) applied to named inputs."""

    name: str = Field(description="Unique node name.")
    in_: str | list[str] = Field(alias="in", description="Input node(s) or model input(s).")
    share: str | None = Field(
        default=None, description="Reuse the module (weights and all) of another node."
    )

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _valid_node_name(cls, value: str) -> str:
        return _check_name(value)

    @model_validator(mode="after")
    def _type_or_share(self) -> NodeSpec:
        if self.type is None and self.share is None:
            raise ValueError("a node needs 'type' (a layer or merge op) or 'share' (another node)")
        if self.type is not None and self.share is not None:
            raise ValueError("a node takes 'type' or 'share', not both")
        return self

    @property
    def inputs(self) -> list[str]:
        return [self.in_] if isinstance(self.in_, str) else list(self.in_)


class ModelSpec(Strict):
    """Either `layers` (Sequential API) or `nodes` + `outputs` (functional API)."""

    layers: list[LayerSpec] | None = Field(default=None, max_length=MAX_NODES)
    nodes: list[NodeSpec] | None = Field(default=None, max_length=MAX_NODES)
    outputs: by_kind(scalar=str, object=dict[str, str]) | None = Field(  # type: ignore[valid-type]
        default=None, description="Node giving each output: a node name, or {output: node}."
    )
    init: InitSpec = Field(default_factory=InitSpec)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if (self.layers is None) == (self.nodes is None):
            raise ValueError("give either 'layers' (Sequential) or 'nodes' + 'outputs' (graph)")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("'layers' must hold at least one layer")
            if self.outputs is not None:
                raise ValueError("'outputs' belongs to graph models ('nodes'), not 'layers'")
        if self.nodes is not None:
            if not self.nodes:
                raise ValueError("'nodes' must hold at least one node")
            if self.outputs is None:
                raise ValueError("a graph model needs 'outputs' naming its output node(s)")
        return self

    @property
    def is_graph(self) -> bool:
        return self.nodes is not None

    def output_nodes(self) -> dict[str, str]:
        """Output name -> node name ('output' for a single output)."""
        assert self.outputs is not None
        return _as_named(self.outputs, "output")

    def graph_sources(self) -> set[str]:
        """Names the nodes read that are not nodes: the model inputs (or typos)."""
        nodes = self.nodes or []
        names = {node.name for node in nodes}
        return {source for node in nodes for source in node.inputs if source not in names}


def single_field_names(model: ModelSpec) -> tuple[str, str]:
    """The names of a single input field and a single target field.

    With one field, there is nothing to match by name: it belongs to the model's
    one input or output whatever that is called. A graph that reads one input
    named `x` gets the single input field as `x`; `"outputs": {"y": node}` gets
    the single target as `y`. Otherwise 'input' and 'output', as Sequential
    models and `"outputs": node` have it.
    """
    input_name, output_name = "input", "output"
    if model.is_graph:
        sources = model.graph_sources()
        if len(sources) == 1:
            input_name = next(iter(sources))
        if isinstance(model.outputs, dict) and len(model.outputs) == 1:
            output_name = next(iter(model.outputs))
    return input_name, output_name


# ----------------------------------------------------------------- training

LossName = Literal[
    "cross_entropy", "nll", "bce", "bce_with_logits", "mse", "l1", "smooth_l1", "huber"
]


class LossSpec(Strict):
    type: LossName
    weight: float = Field(
        default=1.0, ge=0, description="Weight of this output's loss in the total."
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="cross_entropy only")
    class_weights: list[float] | None = Field(default=None, description="cross_entropy/nll only")
    pos_weight: list[float] | float | None = Field(default=None, description="bce_with_logits only")
    beta: float = Field(default=1.0, gt=0, description="smooth_l1 only")
    delta: float = Field(default=1.0, gt=0, description="huber only")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        return value


class OptimizerSpec(Strict):
    type: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=100)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, description="sgd, rmsprop")
    nesterov: bool = Field(default=False, description="sgd")
    dampening: float = Field(default=0.0, ge=0, description="sgd")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adam, adamw")
    eps: float | None = Field(default=None, gt=0, description="adam, adamw, rmsprop, adagrad")
    amsgrad: bool = Field(default=False, description="adam, adamw")
    alpha: float = Field(default=0.99, gt=0, description="rmsprop smoothing")
    lr_decay: float = Field(default=0.0, ge=0, description="adagrad")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerSpec:
        if self.nesterov and (self.type != "sgd" or self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs type 'sgd' with momentum > 0 and dampening 0")
        return self


class StepLRSpec(Strict):
    type: Literal["step"]
    step_size: int = Field(ge=1, description="epochs between decays")
    gamma: float = Field(default=0.1, gt=0)


class MultiStepLRSpec(Strict):
    type: Literal["multistep"]
    milestones: list[int] = Field(min_length=1, description="epochs at which lr decays")
    gamma: float = Field(default=0.1, gt=0)


class ExponentialLRSpec(Strict):
    type: Literal["exponential"]
    gamma: float = Field(gt=0)


class CosineLRSpec(Strict):
    """Cosine decay over the whole run, stepped per batch, after a linear warmup."""

    type: Literal["cosine"]
    warmup_steps: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0)


class OneCycleLRSpec(Strict):
    type: Literal["onecycle"]
    max_lr: float | None = Field(default=None, gt=0, description="default: optimizer.lr")
    pct_start: float = Field(default=0.3, gt=0, lt=1)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = Field(default=25.0, gt=0)
    final_div_factor: float = Field(default=1e4, gt=0)


class ReduceOnPlateauSpec(Strict):
    type: Literal["reduce_on_plateau"]
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(default=0.1, gt=0, lt=1)
    patience: int = Field(default=10, ge=0)
    threshold: float = Field(default=1e-4, ge=0)
    cooldown: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0)


SchedulerSpec = Annotated[
    StepLRSpec
    | MultiStepLRSpec
    | ExponentialLRSpec
    | CosineLRSpec
    | OneCycleLRSpec
    | ReduceOnPlateauSpec,
    Field(discriminator="type"),
]


class MetricSpec(Strict):
    type: Literal["accuracy", "top_k_accuracy", "mae", "mse", "rmse"]
    k: int = Field(default=5, ge=1, description="top_k_accuracy only")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        return value

    @property
    def key(self) -> str:
        """The metric's name in reports (`accuracy`, `top_5_accuracy`, ...)."""
        return f"top_{self.k}_accuracy" if self.type == "top_k_accuracy" else self.type


class TrainingSpec(Strict):
    epochs: int = Field(default=10, ge=1, le=100_000)
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many optimizer steps"
    )
    max_time_s: float | None = Field(
        default=None, gt=0, description="stop after this much wall time"
    )
    loss: by_kind(scalar=LossSpec, typed=LossSpec, object=dict[str, LossSpec]) = Field(  # type: ignore[valid-type]
        description="A loss name, {type, ...}, or per output {output: loss}."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec | None = None
    metrics: by_kind(list=list[MetricSpec], object=dict[str, list[MetricSpec]]) = Field(  # type: ignore[valid-type]
        default_factory=list, description="Metrics for every output, or per output."
    )
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    grad_clip_norm: float | None = Field(default=None, gt=0)
    accumulate_grad_batches: int = Field(default=1, ge=1, le=10_000)
    compile: bool = False
    deterministic: bool = False
    tf32: bool = Field(
        default=False,
        description="allow TF32 for float32 matmuls on CUDA (Ampere and later); "
        "off by default, as in PyTorch",
    )
    log_every_n_steps: int = Field(default=50, ge=1)
    sync_batchnorm: bool = Field(
        default=False,
        description="data-parallel runs on GPUs: BatchNorm statistics over the global batch "
        "(torch.nn.SyncBatchNorm) instead of each rank's share",
    )

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, found {value!r}")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_aliases(cls, value: Any) -> Any:
        aliases = {32: "32", "fp32": "32", "bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed"}
        return aliases.get(value, value)

    def losses(self, outputs: list[str]) -> dict[str, LossSpec]:
        """Output name -> loss. A single loss applies to every output."""
        if isinstance(self.loss, LossSpec):
            return {name: self.loss for name in outputs}
        return dict(self.loss)

    def metrics_for(self, outputs: list[str]) -> dict[str, list[MetricSpec]]:
        if isinstance(self.metrics, list):
            return {name: list(self.metrics) for name in outputs}
        return {name: list(self.metrics.get(name, [])) for name in outputs}


# ---------------------------------------------------------------- callbacks


class CheckpointSpec(Strict):
    monitor: str | None = Field(
        default=None,
        description="Metric to rank epochs by; default val_loss (loss without validation).",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None, description="default: max for accuracy metrics, else min"
    )
    save_top_k: int = Field(default=1, ge=0, le=100)
    save_last: bool = True
    every_n_epochs: int = Field(default=1, ge=1)


class EarlyStoppingSpec(Strict):
    monitor: str | None = None
    mode: Literal["min", "max"] | None = None
    patience: int = Field(default=5, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    start_from_epoch: int = Field(default=0, ge=0)
    restore_best_weights: bool = False


class CallbacksSpec(Strict):
    checkpoint: CheckpointSpec | None = Field(default_factory=CheckpointSpec)
    early_stopping: EarlyStoppingSpec | None = None
    terminate_on_nan: bool = True


MAX_RANKS_PER_NODE = 64
MAX_NODES_PER_JOB = 256


class ResourcesSpec(Strict):
    """Where a job runs. More than one rank in all (gpus or processes, times nodes) trains
    data-parallel: DistributedDataParallel, one rank per GPU (NCCL) or per CPU process (gloo)."""

    gpus: int | None = Field(
        default=None,
        ge=0,
        le=MAX_RANKS_PER_NODE,
        description="GPUs per node, one rank each; default 1 when training.device is cuda, else 0.",
    )
    processes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RANKS_PER_NODE,
        description="CPU ranks per node (gloo), for training without GPUs; not with gpus.",
    )
    nodes: int = Field(
        default=1, ge=1, le=MAX_NODES_PER_JOB, description="machines the ranks are spread over"
    )
    memory_gb: float | None = Field(default=None, gt=0)

    @property
    def ranks_per_node(self) -> int:
        return self.gpus or self.processes or 1

    @property
    def world_size(self) -> int:
        """Ranks in all: the global batch is split among them."""
        return self.ranks_per_node * self.nodes

    @property
    def gpu_ranks(self) -> bool:
        """One rank per GPU (NCCL); otherwise ranks on CPUs (gloo)."""
        return bool(self.gpus)


# -------------------------------------------------------------------- a job


class JobSpec(Strict):
    """A whole training job: data, model, training, callbacks, resources."""

    name: str = Field(default="job", min_length=1, max_length=200)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    data: DataSpec
    model: ModelSpec
    training: TrainingSpec
    callbacks: CallbacksSpec = Field(default_factory=CallbacksSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_restarts: int = Field(default=3, ge=0, le=100)
    # Metadata for organising jobs; the engine ignores it.
    project: Label = Field(default="default", description="The project the job belongs to.")
    tags: Tags = Field(default_factory=list, description=f"At most {MAX_TAGS} labels.")
    note: Note = Field(default="", description="Free text, at most 10,000 characters.")

    @model_validator(mode="after")
    def _name_single_fields(self) -> JobSpec:
        self.data._input_name, self.data._output_name = single_field_names(self.model)
        return self

    def dump(self, **kwargs: Any) -> dict[str, Any]:
        """The spec as plain JSON data (defaults filled in).

        Pydantic warns when serialising our JSON-type-discriminated unions; the
        output is right (checked in tests), so the warnings are noise.
        """
        return self.model_dump(mode="json", warnings=False, **kwargs)

    @property
    def output_names(self) -> list[str]:
        return list(self.data.target_fields())

    @property
    def input_names(self) -> list[str]:
        return list(self.data.input_fields())


def default_mode(monitor: str) -> Literal["min", "max"]:
    """Keras's rule: accuracy-like metrics are maximised, everything else minimised."""
    return "max" if "accuracy" in monitor else "min"


def default_monitor(spec: JobSpec) -> str:
    return "val_loss" if spec.data.validation is not None else "loss"


def parse_spec(document: str | bytes | dict[str, Any]) -> JobSpec:
    """Parse and check a job spec; raise SpecError listing every problem with its path."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [
                    SpecIssue(
                        "", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                    )
                ]
            ) from None
        except RecursionError:
            raise SpecError([SpecIssue("", "JSON nested too deeply")]) from None
        except ValueError as exc:  # an integer past Python's 4300-digit limit; bad UTF-8
            raise SpecError([SpecIssue("", f"malformed JSON: {exc}")]) from None
    if not isinstance(document, dict):
        raise SpecError(
            [SpecIssue("", f"a job spec is a JSON object, found {type(document).__name__}")]
        )
    try:
        spec = JobSpec.model_validate(document)
    except ValidationError as exc:
        raise SpecError.from_validation(exc, document) from None
    except RecursionError:
        raise SpecError([SpecIssue("", "JSON nested too deeply")]) from None
    issues = resource_issues(spec)
    if issues:
        raise SpecError(issues)
    return spec


def resource_issues(spec: JobSpec) -> list[SpecIssue]:
    """What in `resources` does not fit the rest of the spec, each at its own path.

    Checked here, not in a model validator: these name places in other sections
    (`data.batch_size`, `training.device`), which a validator's error cannot."""
    res, training = spec.resources, spec.training
    issues: list[SpecIssue] = []
    if res.processes is not None and res.gpus:
        issues.append(
            SpecIssue(
                "resources.processes",
                f"give processes (CPU ranks) or gpus (a rank per GPU), not both; "
                f"found processes {res.processes} and gpus {res.gpus}",
            )
        )
        return issues
    world = res.world_size
    if world > 1 and not res.gpu_ranks and training.device.startswith("cuda"):
        issues.append(
            SpecIssue(
                "resources.processes" if res.processes is not None else "resources.nodes",
                f"{world} ranks without resources.gpus run on CPUs (gloo), but training.device "
                f"is {training.device!r}: give resources.gpus for a rank per GPU",
            )
        )
    if res.gpus is not None and res.gpus > 1:
        if training.device == "cpu":
            issues.append(
                SpecIssue(
                    "training.device",
                    f"resources.gpus {res.gpus} trains on GPUs, but training.device is 'cpu': "
                    f"use 'auto' or 'cuda', or resources.processes for CPU ranks",
                )
            )
        elif training.device.startswith("cuda:"):
            issues.append(
                SpecIssue(
                    "training.device",
                    f"resources.gpus {res.gpus} runs a rank on each GPU of the job's set; "
                    f"{training.device!r} names one GPU: use 'cuda' or 'auto'",
                )
            )
    if training.sync_batchnorm and world > 1 and not res.gpu_ranks:
        issues.append(
            SpecIssue(
                "training.sync_batchnorm",
                "torch.nn.SyncBatchNorm runs on GPU ranks only; CPU ranks (gloo) normalise "
                "each rank's share of the batch: set it false, or train on resources.gpus",
            )
        )
    if spec.data.batch_size % world:
        shape = f"{res.ranks_per_node} {'gpus' if res.gpu_ranks else 'processes'}"
        issues.append(
            SpecIssue(
                "data.batch_size",
                f"the global batch is split evenly among the {world} ranks ({shape} x "
                f"{res.nodes} node{'s' if res.nodes > 1 else ''}): {spec.data.batch_size} is "
                f"not a multiple of {world}",
            )
        )
    return issues


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec, with the layer allowlist spelled out."""
    from worker.engine.layers import layer_schema

    schema = JobSpec.model_json_schema(by_alias=True)
    schema["$defs"]["LayerSpec"]["description"] += "\n\n" + layer_schema()["description"]
    schema["$defs"]["LayerSpec"]["x-layer-types"] = layer_schema()["layers"]
    return schema
