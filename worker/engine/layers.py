"""The layer allowlist: the torch.nn classes a spec may name, their arguments, what is inferred.

A layer item is `type` plus the keyword arguments of the torch.nn class. Arguments
that follow from the input shape (in_features, in_channels, ...) are inferred,
Keras style. Nothing outside this table can be built, and nothing in a spec is
imported or evaluated.

Shapes here are per sample (no batch dimension), as `FieldInfo` gives them.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.errors import closest

Shape = tuple[int, ...]
Infer = Callable[[list[Shape], dict[str, Any]], dict[str, Any]]  # input shapes, args -> inferred
Output = Callable[[list[Shape], dict[str, Any]], Shape]  # input shapes, all args -> output


class ShapeError(ValueError):
    """A layer cannot take its input shape(s); the message says why, without the layer name."""


def show_shape(shape: tuple[int, ...]) -> str:
    """A per-sample shape as the user's arrays have it: (16, 8) -> (batch, 16, 8)."""
    return "(" + ", ".join(["batch", *map(str, shape)]) + (",)" if not shape else ")")


def _show(value: Any) -> str:
    """A JSON value as the user wrote it."""
    words = {True: "true", False: "false", None: "null"}
    text = words[value] if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------- argument types


class _Invalid(Exception):
    """A value of the wrong type; an optional argument overrides the type's expected phrase."""


@dataclass(frozen=True)
class ArgType:
    """How an argument is written in JSON, and how it becomes what torch takes."""

    name: str  # for the schema: "integer or list of 2 integers"
    expected: str  # for errors: "expected an integer, found 'ten'"
    convert: Callable[[Any], Any]  # raises _Invalid

    def __call__(self, value: Any) -> Any:
        return self.convert(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(minimum: int | None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not _is_int(value):
            raise _Invalid("an integer")
        if minimum is not None and value < minimum:
            raise _Invalid
        return value

    return convert


def _number(value: Any) -> float:
    if not _is_number(value):
        raise _Invalid
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range: 10**400
        raise _Invalid("a finite number") from None
    if not math.isfinite(number):  # NaN and Infinity are not JSON, but Python's parser takes them
        raise _Invalid("a finite number")
    return number


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


INT = ArgType("integer", "an integer", _integer(None))
POSITIVE = ArgType("positive integer", "a positive integer", _integer(1))
NON_NEGATIVE = ArgType("non-negative integer", "a non-negative integer", _integer(0))
NUMBER = ArgType("number", "a number", _number)
BOOL = ArgType("boolean", "true or false", _boolean)


def choice(*options: str) -> ArgType:
    listed = ", ".join(repr(o) for o in options)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid
        return value

    return ArgType(f"one of {listed}", f"one of {listed}", convert)


def size(n: int, minimum: int = 1, extra: tuple[str, ...] = ()) -> ArgType:
    """An int, or a JSON list of n ints where torch takes a tuple; `extra` strings allowed too."""
    word = "positive" if minimum == 1 else "non-negative"
    several = f"{n} {word} integers" if n > 1 else f"one {word} integer"
    name = f"{word} integer or list of {several}"
    expected = f"a {word} integer or a list of {several}"
    if extra:
        strings = " or ".join(repr(s) for s in extra)
        name += f" or {strings}"
        expected += f" or {strings}"
    one = _integer(minimum)

    def convert(value: Any) -> Any:
        if isinstance(value, str) and value in extra:
            return value
        try:
            if isinstance(value, list) and len(value) == n:
                return tuple(one(v) for v in value)
            return one(value)
        except _Invalid:
            raise _Invalid from None  # the whole phrase says more than "an integer"

    return ArgType(name, expected, convert)


def optional(inner: ArgType) -> ArgType:
    def convert(value: Any) -> Any:
        return None if value is None else inner(value)

    return ArgType(f"{inner.name} or null", f"{inner.expected} or null", convert)


def _int_list(value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
        raise _Invalid
    return list(value)


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Arg:
    name: str
    type: ArgType
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


# ------------------------------------------------------------------ layer defs


@dataclass(frozen=True)
class LayerDef:
    """One allowed layer type.

    `factory(**user_args, **inferred)` builds the module. `infer(shapes, args)`
    checks the input shape(s) and returns the inferred arguments, raising
    ShapeError when the layer cannot take them. `output(shapes, args)` gives the
    output shape where the rule is plain; without it, build runs the module on
    meta tensors. (Meta kernels of linear, relu, LSTM, ... are Python
    decompositions, up to 50 ms a call: too slow for 10,000-node graphs.)
    """

    name: str  # canonical, snake_case: "conv2d", "leaky_relu"
    factory: Callable[..., nn.Module]
    doc: str
    args: tuple[Arg, ...] = ()
    inferred: tuple[str, ...] = ()
    infer: Infer | None = None
    output: Output | None = None
    # "(batch, channels, height, width)": the input ranks accepted ("..." = any number of dims)
    layout: str | None = None
    inputs: int | None = 1  # None: two or more (merge ops)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # torch args we always set
    integer_input: bool = False  # takes token ids (embedding)

    @property
    def is_merge(self) -> bool:
        return self.inputs is None

    def arg(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)

    def check_input(self, shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
        """The inferred arguments for these input shapes; ShapeError if they do not fit."""
        if self.layout is not None and not _fits(shapes[0], self.layout):
            raise ShapeError(f"it expects {self.layout}")
        return self.infer(shapes, args) if self.infer else {}


def _fits(shape: Shape, layout: str) -> bool:
    for option in layout.split(" or "):
        dims = option.strip("()").split(", ")[1:]  # drop "batch"
        if "..." in dims:
            if len(shape) >= len(dims) - 1:
                return True
        elif len(shape) == len(dims):
            return True
    return False


def check_args(
    layer: LayerDef, given: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """Check a layer's written arguments.

    Returns (torch kwargs with defaults filled in, values written for inferred
    arguments, problems as (argument, message)).
    """
    kwargs = {a.name: a.default for a in layer.args if not a.required}
    claimed: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in given.items():
        arg = layer.arg(key)
        if arg is not None:
            try:
                kwargs[key] = arg.type(value)
            except _Invalid as exc:
                expected = exc.args[0] if exc.args else arg.type.expected
                problems.append((key, f"expected {expected}, found {_show(value)}"))
        elif key in layer.inferred:
            claimed[key] = value
        elif key in layer.fixed:
            fixed = layer.fixed[key]
            if type(value) is not type(fixed) or value != fixed:
                always = f"{layer.name} always uses {key}={_show(fixed)}, inputs {layer.layout}"
                problems.append((key, f"{always}; found {_show(value)}"))
        else:
            known = [a.name for a in layer.args]
            near = closest(key, [*known, *layer.inferred])
            hint = (
                f"closest: {', '.join(near)}"
                if near
                else f"arguments: {', '.join(known) or 'none'}"
            )
            problems.append((key, f"unknown argument '{key}' for {layer.name} ({hint})"))
    for arg in layer.args:
        if arg.required and arg.name not in given:
            problems.append((arg.name, f"missing (required by {layer.name})"))
    return kwargs, claimed, problems


def same_value(written: Any, inferred: Any) -> bool:
    """A written inferred argument matches: 64 and [64] are the same normalized_shape."""

    def norm(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(v)
        return (v,) if _is_int(v) else v

    return not isinstance(written, bool) and norm(written) == norm(inferred)


# ------------------------------------------------------ modules we add to torch


class LastStepMixin:
    """Keras-style recurrent output: the last step (B, H*dirs) unless return_sequences."""

    def __init__(self, *args: Any, return_sequences: bool = False, **kwargs: Any):
        super().__init__(*args, batch_first=True, **kwargs)  # type: ignore[call-arg]
        self.return_sequences = return_sequences

    def forward(self, x: Tensor) -> Tensor:
        out, state = super().forward(x)  # type: ignore[misc]
        if self.return_sequences:
            return out
        h_n = state[0] if isinstance(state, tuple) else state
        # h_n is (layers * dirs, B, H), layer-major: the last layer's directions are at the end.
        dirs = 2 if self.bidirectional else 1  # type: ignore[attr-defined]
        return h_n[-1] if dirs == 1 else torch.cat([h_n[-2], h_n[-1]], dim=-1)


class LSTM(LastStepMixin, nn.LSTM):  # type: ignore[misc]  # forward returns one tensor
    pass


class GRU(LastStepMixin, nn.GRU):  # type: ignore[misc]  # forward returns one tensor
    pass


class RNN(LastStepMixin, nn.RNN):  # type: ignore[misc]  # forward returns one tensor
    pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # normal_ on meta tensors imports torch._dynamo (4 s, once per process); meta
        # weights hold no values, so there is nothing to initialise anyway.
        if not self.weight.is_meta:
            super().reset_parameters()


class SelfAttention(nn.MultiheadAttention):
    """Multi-head self-attention on (batch, time, embed); returns only the attended values."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
    ):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        mask = None
        if self.causal:
            steps = x.shape[1]
            mask = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        out, _ = super().forward(x, x, x, need_weights=False, attn_mask=mask, is_causal=self.causal)
        return out


class Reshape(nn.Module):
    def __init__(self, shape: list[int]):
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def _sum(xs: tuple[Tensor, ...]) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


class Add(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        return _sum(xs)


class Multiply(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out


class Mean(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        return _sum(xs) / len(xs)


class Concat(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ------------------------------------------------------------ shape inference


def _last(name: str) -> Infer:
    return lambda shapes, args: {name: shapes[0][-1]}


def _channels(name: str) -> Infer:
    return lambda shapes, args: {name: shapes[0][0]}


def _heads(embed: str, heads: str) -> Infer:
    def infer(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
        width = shapes[0][-1]
        if width % args[heads]:
            raise ShapeError(
                f"{embed} {width} (the last dim) is not divisible by {heads} {args[heads]}"
            )
        return {embed: width}

    return infer


def _same(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    return shapes[0]


def _features(name: str) -> Output:
    return lambda shapes, args: (*shapes[0][:-1], args[name])


def _bilinear(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    first, second = shapes
    if not first or not second or first[:-1] != second[:-1]:
        raise ShapeError("both inputs need a last (features) dim, and their other dims must match")
    return {"in1_features": first[-1], "in2_features": second[-1]}


def _recurrent_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    width = (args.get("proj_size") or args["hidden_size"]) * (2 if args["bidirectional"] else 1)
    return (shapes[0][0], width) if args["return_sequences"] else (width,)


def _prelu(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    count = args["num_parameters"]
    if count != 1 and (not shapes[0] or shapes[0][0] != count):
        raise ShapeError(f"num_parameters {count} must be 1 or the number of channels (dim 1)")
    return {}


def _dim(dim: int, rank: int, what: str = "dim") -> int:
    """A torch dim (counting the batch dim) normalized; the batch dim itself is refused."""
    if not -rank <= dim < rank:
        raise ShapeError(f"{what} {dim} is out of range for {rank} dims (batch included)")
    if dim % rank == 0:
        raise ShapeError(f"{what} {dim} is the batch dim")
    return dim % rank


def _flatten(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    rank = len(shapes[0]) + 1
    start = _dim(args["start_dim"], rank, "start_dim")
    if start > _dim(args["end_dim"], rank, "end_dim"):
        raise ShapeError(f"start_dim {args['start_dim']} comes after end_dim {args['end_dim']}")
    return {}


def _flatten_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    shape, rank = shapes[0], len(shapes[0]) + 1
    start, end = args["start_dim"] % rank - 1, args["end_dim"] % rank - 1
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])


def _along_dim(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    _dim(args["dim"], len(shapes[0]) + 1)
    return {}


def _reshape(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    target = args["shape"]
    values = math.prod(shapes[0])
    known = math.prod(d for d in target if d != -1)
    if (-1 in target and values % known) or (-1 not in target and known != values):
        raise ShapeError(
            f"its {values} values per sample do not fit shape {show_shape(tuple(target))}"
        )
    return {}


def _reshape_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    target = args["shape"]
    rest = math.prod(shapes[0]) // math.prod(d for d in target if d != -1)
    return tuple(rest if d == -1 else d for d in target)


def _permute(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    dims, rank = args["dims"], len(shapes[0]) + 1
    if sorted(dims) != list(range(rank)):
        raise ShapeError(f"dims {dims} is not an ordering of 0..{rank - 1} (batch dim included)")
    return {}


def _permute_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    return tuple(shapes[0][d - 1] for d in args["dims"][1:])


def _broadcast(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    # Same rank on purpose: with different ranks torch would line the batch dim of
    # one input up with a feature dim of another, which works only by accident.
    if len({len(s) for s in shapes}) > 1:
        raise ShapeError("they have different numbers of dims")
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ShapeError("they do not broadcast (each dim must be equal, or 1)") from None
    return {}


def _broadcast_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    return tuple(torch.broadcast_shapes(*shapes))


def _concat(shapes: list[Shape], args: dict[str, Any]) -> dict[str, Any]:
    if len({len(s) for s in shapes}) > 1:
        raise ShapeError("they have different numbers of dims")
    dim = _dim(args["dim"], len(shapes[0]) + 1) - 1
    if len({s[:dim] + s[dim + 1 :] for s in shapes}) > 1:
        raise ShapeError(f"all dims but dim {args['dim']} must match")
    return {}


def _concat_output(shapes: list[Shape], args: dict[str, Any]) -> Shape:
    dim = args["dim"] % (len(shapes[0]) + 1) - 1
    first = shapes[0]
    return (*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1 :])


# --------------------------------------------------------------------- the table

_SPATIAL = {1: "length", 2: "height, width", 3: "depth, height, width"}


def _layout(n: int) -> str:
    return f"(batch, channels, {_SPATIAL[n]})"


def _conv(n: int) -> LayerDef:
    return LayerDef(
        f"conv{n}d",
        getattr(nn, f"Conv{n}d"),
        f"{n}-d convolution.",
        args=(
            Arg("out_channels", POSITIVE),
            Arg("kernel_size", size(n)),
            Arg("stride", size(n), 1),
            Arg("padding", size(n, 0, ("same", "valid")), 0),
            Arg("dilation", size(n), 1),
            Arg("groups", POSITIVE, 1),
            Arg("bias", BOOL, True),
            Arg("padding_mode", choice("zeros", "reflect", "replicate", "circular"), "zeros"),
        ),
        inferred=("in_channels",),
        infer=_channels("in_channels"),
        layout=_layout(n),
    )


def _conv_transpose(n: int) -> LayerDef:
    return LayerDef(
        f"convtranspose{n}d",
        getattr(nn, f"ConvTranspose{n}d"),
        f"{n}-d transposed convolution (upsampling).",
        args=(
            Arg("out_channels", POSITIVE),
            Arg("kernel_size", size(n)),
            Arg("stride", size(n), 1),
            Arg("padding", size(n, 0), 0),
            Arg("output_padding", size(n, 0), 0),
            Arg("groups", POSITIVE, 1),
            Arg("bias", BOOL, True),
            Arg("dilation", size(n), 1),
        ),
        inferred=("in_channels",),
        infer=_channels("in_channels"),
        layout=_layout(n),
    )


def _max_pool(n: int) -> LayerDef:
    return LayerDef(
        f"maxpool{n}d",
        getattr(nn, f"MaxPool{n}d"),
        f"{n}-d max pooling; stride defaults to kernel_size.",
        args=(
            Arg("kernel_size", size(n)),
            Arg("stride", optional(size(n)), None),
            Arg("padding", size(n, 0), 0),
            Arg("dilation", size(n), 1),
            Arg("ceil_mode", BOOL, False),
        ),
        layout=_layout(n),
    )


def _avg_pool(n: int) -> LayerDef:
    extra = (Arg("divisor_override", optional(POSITIVE), None),) if n > 1 else ()
    return LayerDef(
        f"avgpool{n}d",
        getattr(nn, f"AvgPool{n}d"),
        f"{n}-d average pooling; stride defaults to kernel_size.",
        args=(
            Arg("kernel_size", size(n)),
            Arg("stride", optional(size(n)), None),
            Arg("padding", size(n, 0), 0),
            Arg("ceil_mode", BOOL, False),
            Arg("count_include_pad", BOOL, True),
            *extra,
        ),
        layout=_layout(n),
    )


def _adaptive_pool(kind: str, n: int) -> LayerDef:
    return LayerDef(
        f"adaptive{kind}pool{n}d",
        getattr(nn, f"Adaptive{kind.capitalize()}Pool{n}d"),
        f"{n}-d adaptive {kind} pooling to a fixed output_size.",
        args=(Arg("output_size", size(n)),),
        layout=_layout(n),
    )


def _batch_norm(n: int) -> LayerDef:
    return LayerDef(
        f"batchnorm{n}d",
        getattr(nn, f"BatchNorm{n}d"),
        "Batch normalization over the channel dim.",
        args=(
            Arg("eps", NUMBER, 1e-5),
            Arg("momentum", optional(NUMBER), 0.1),
            Arg("affine", BOOL, True),
            Arg("track_running_stats", BOOL, True),
        ),
        inferred=("num_features",),
        infer=_channels("num_features"),
        output=_same,
        layout="(batch, features) or (batch, channels, length)" if n == 1 else _layout(n),
    )


def _dropout(name: str, cls: type[nn.Module], layout: str | None) -> LayerDef:
    return LayerDef(
        name,
        cls,
        "Dropout (active in training only).",
        args=(Arg("p", NUMBER, 0.5),),
        output=_same,
        layout=layout,
    )


def _recurrent(name: str, cls: type[nn.Module], extra: tuple[Arg, ...] = ()) -> LayerDef:
    return LayerDef(
        name,
        cls,
        f"{name.upper()} over (batch, time, features). return_sequences=false gives the last "
        "step (batch, hidden*dirs); true gives every step (batch, time, hidden*dirs).",
        args=(
            Arg("hidden_size", POSITIVE),
            Arg("num_layers", POSITIVE, 1),
            Arg("bias", BOOL, True),
            Arg("dropout", NUMBER, 0.0),
            Arg("bidirectional", BOOL, False),
            *extra,
            Arg("return_sequences", BOOL, False),
        ),
        inferred=("input_size",),
        infer=_last("input_size"),
        output=_recurrent_output,
        layout="(batch, time, features)",
        fixed={"batch_first": True},
    )


def _activation(name: str, cls: type[nn.Module], doc: str, *args: Arg) -> LayerDef:
    return LayerDef(name, cls, doc, args=args, output=_same)


def _softmax(name: str, cls: type[nn.Module]) -> LayerDef:
    return LayerDef(
        name,
        cls,
        f"{cls.__name__} along dim (counting the batch dim).",
        args=(Arg("dim", INT, -1),),
        infer=_along_dim,
        output=_same,
    )


def _reshape_shape(value: Any) -> list[int]:
    target = _int_list(value)
    if target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
        raise _Invalid
    return target


def _permute_dims(value: Any) -> list[int]:
    dims = _int_list(value)
    if dims[0] != 0:
        raise _Invalid
    return dims


_RESHAPE_SHAPE = ArgType(
    "list of integers (one may be -1)",
    "a list of positive integers, one of which may be -1",
    _reshape_shape,
)
_PERMUTE_DIMS = ArgType(
    "list of integers starting with 0",
    "a list of dims starting with 0 (the batch dim stays first), like [0, 2, 1]",
    _permute_dims,
)

_LAYER_LIST: list[LayerDef] = [
    LayerDef(
        "linear",
        nn.Linear,
        "Fully connected layer on the last dim.",
        args=(Arg("out_features", POSITIVE), Arg("bias", BOOL, True)),
        inferred=("in_features",),
        infer=_last("in_features"),
        output=_features("out_features"),
        layout="(batch, ..., features)",
    ),
    LayerDef(
        "bilinear",
        nn.Bilinear,
        "Bilinear layer x1^T A x2 + b on two inputs.",
        args=(Arg("out_features", POSITIVE), Arg("bias", BOOL, True)),
        inferred=("in1_features", "in2_features"),
        infer=_bilinear,
        output=_features("out_features"),
        inputs=2,
    ),
    *(_conv(n) for n in (1, 2, 3)),
    *(_conv_transpose(n) for n in (1, 2, 3)),
    *(_max_pool(n) for n in (1, 2, 3)),
    *(_avg_pool(n) for n in (1, 2, 3)),
    *(_adaptive_pool(kind, n) for kind in ("avg", "max") for n in (1, 2)),
    *(_batch_norm(n) for n in (1, 2, 3)),
    LayerDef(
        "layernorm",
        nn.LayerNorm,
        "Layer normalization over the last dim.",
        args=(
            Arg("eps", NUMBER, 1e-5),
            Arg("elementwise_affine", BOOL, True),
            Arg("bias", BOOL, True),
        ),
        inferred=("normalized_shape",),
        infer=_last("normalized_shape"),
        output=_same,
        layout="(batch, ..., features)",
    ),
    LayerDef(
        "groupnorm",
        nn.GroupNorm,
        "Group normalization; the channels must divide into num_groups.",
        args=(Arg("num_groups", POSITIVE), Arg("eps", NUMBER, 1e-5), Arg("affine", BOOL, True)),
        inferred=("num_channels",),
        infer=_channels("num_channels"),
        output=_same,
        layout="(batch, channels, ...)",
    ),
    _dropout("dropout", nn.Dropout, None),
    _dropout("dropout1d", nn.Dropout1d, "(batch, channels, length)"),
    _dropout("dropout2d", nn.Dropout2d, "(batch, channels, height, width)"),
    LayerDef(
        "embedding",
        Embedding,
        "Lookup table: integer token ids straight from a model input -> vectors.",
        args=(
            Arg("num_embeddings", POSITIVE),
            Arg("embedding_dim", POSITIVE),
            Arg("padding_idx", optional(INT), None),
            Arg("max_norm", optional(NUMBER), None),
            Arg("norm_type", NUMBER, 2.0),
            Arg("scale_grad_by_freq", BOOL, False),
        ),
        output=lambda shapes, args: (*shapes[0], args["embedding_dim"]),
        integer_input=True,
    ),
    _recurrent("lstm", LSTM, (Arg("proj_size", NON_NEGATIVE, 0),)),
    _recurrent("gru", GRU),
    _recurrent("rnn", RNN, (Arg("nonlinearity", choice("tanh", "relu"), "tanh"),)),
    LayerDef(
        "multiheadattention",
        SelfAttention,
        "Multi-head self-attention on (batch, time, embed); causal=true masks future steps.",
        args=(
            Arg("num_heads", POSITIVE),
            Arg("dropout", NUMBER, 0.0),
            Arg("bias", BOOL, True),
            Arg("causal", BOOL, False),
        ),
        inferred=("embed_dim",),
        infer=_heads("embed_dim", "num_heads"),
        output=_same,
        layout="(batch, time, embed)",
        fixed={"batch_first": True},
    ),
    LayerDef(
        "transformerencoderlayer",
        functools.partial(nn.TransformerEncoderLayer, batch_first=True),
        "Transformer encoder block (self-attention + feed-forward) on (batch, time, d_model).",
        args=(
            Arg("nhead", POSITIVE),
            Arg("dim_feedforward", POSITIVE, 2048),
            Arg("dropout", NUMBER, 0.1),
            Arg("activation", choice("relu", "gelu"), "relu"),
            Arg("layer_norm_eps", NUMBER, 1e-5),
            Arg("norm_first", BOOL, False),
            Arg("bias", BOOL, True),
        ),
        inferred=("d_model",),
        infer=_heads("d_model", "nhead"),
        output=_same,
        layout="(batch, time, d_model)",
        fixed={"batch_first": True},
    ),
    LayerDef(
        "flatten",
        nn.Flatten,
        "Flatten dims start_dim..end_dim (torch dims: 1 is the first dim after batch).",
        args=(Arg("start_dim", INT, 1), Arg("end_dim", INT, -1)),
        infer=_flatten,
        output=_flatten_output,
    ),
    LayerDef(
        "reshape",
        Reshape,
        "Reshape each sample to `shape` (batch dim excluded; one -1 allowed).",
        args=(Arg("shape", _RESHAPE_SHAPE),),
        infer=_reshape,
        output=_reshape_output,
    ),
    LayerDef(
        "permute",
        Permute,
        "Reorder dims (torch convention, batch dim included and first), e.g. [0, 2, 1].",
        args=(Arg("dims", _PERMUTE_DIMS),),
        infer=_permute,
        output=_permute_output,
    ),
    _activation("identity", nn.Identity, "Passes its input through."),
    _activation("relu", nn.ReLU, "ReLU."),
    _activation("leaky_relu", nn.LeakyReLU, "Leaky ReLU.", Arg("negative_slope", NUMBER, 0.01)),
    _activation("gelu", nn.GELU, "GELU.", Arg("approximate", choice("none", "tanh"), "none")),
    _activation("silu", nn.SiLU, "SiLU (swish)."),
    _activation("elu", nn.ELU, "ELU.", Arg("alpha", NUMBER, 1.0)),
    _activation("selu", nn.SELU, "SELU."),
    LayerDef(
        "prelu",
        nn.PReLU,
        "PReLU with a learned slope: one, or one per channel (dim 1).",
        args=(Arg("num_parameters", POSITIVE, 1),),
        infer=_prelu,
        output=_same,
    ),
    _activation("mish", nn.Mish, "Mish."),
    _activation(
        "softplus",
        nn.Softplus,
        "Softplus.",
        Arg("beta", NUMBER, 1.0),
        Arg("threshold", NUMBER, 20.0),
    ),
    _activation("hardswish", nn.Hardswish, "Hard swish."),
    _activation("tanh", nn.Tanh, "Tanh."),
    _activation("sigmoid", nn.Sigmoid, "Sigmoid."),
    _softmax("softmax", nn.Softmax),
    _softmax("log_softmax", nn.LogSoftmax),
]


def _elementwise(name: str, cls: type[nn.Module], what: str) -> LayerDef:
    return LayerDef(
        name,
        cls,
        f"Elementwise {what} of 2 or more inputs of equal rank (dims broadcast: equal, or 1).",
        infer=_broadcast,
        output=_broadcast_output,
        inputs=None,
    )


_MERGE_LIST: list[LayerDef] = [
    _elementwise("add", Add, "sum"),
    _elementwise("multiply", Multiply, "product"),
    _elementwise("mean", Mean, "mean"),
    LayerDef(
        "concat",
        Concat,
        "Concatenate 2 or more inputs along dim (counting the batch dim); other dims must match.",
        args=(Arg("dim", INT, -1),),
        infer=_concat,
        output=_concat_output,
        inputs=None,
    ),
]


def type_key(name: str) -> str:
    """The lookup key of a type name: 'LeakyReLU', 'leaky_relu' and 'leakyrelu' are one."""
    return name.lower().replace("_", "")


LAYERS: dict[str, LayerDef] = {type_key(d.name): d for d in _LAYER_LIST}
MERGE_OPS: dict[str, LayerDef] = {type_key(d.name): d for d in _MERGE_LIST}


def resolve_type(name: str) -> LayerDef | None:
    """The layer (or merge op) a spec's `type` names, or None."""
    key = type_key(name)
    return LAYERS.get(key) or MERGE_OPS.get(key)


def closest_types(name: str, merge_ops: bool = True) -> list[str]:
    table = {**LAYERS, **MERGE_OPS} if merge_ops else LAYERS
    return [table[key].name for key in closest(type_key(name), table)]


# ----------------------------------------------------------------------- schema


def _json_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _describe_arg(arg: Arg) -> str:
    if arg.required:
        return f"{arg.name} ({arg.type.name}, required)"
    default = _json_default(arg.default)
    shown = "null" if default is None else _show(default)
    return f"{arg.name} ({arg.type.name}, default {shown})"


def _describe(layer: LayerDef) -> str:
    parts = [f"- `{layer.name}`: {layer.doc}"]
    if layer.layout:
        parts.append(f"Input {layer.layout}.")
    if layer.inputs is None:
        parts.append("Inputs: 2 or more.")
    elif layer.inputs > 1:
        parts.append(f"Inputs: {layer.inputs}.")
    if layer.args:
        parts.append("Arguments: " + "; ".join(_describe_arg(a) for a in layer.args) + ".")
    if layer.inferred:
        parts.append(f"Inferred from the input: {', '.join(layer.inferred)}.")
    return " ".join(parts)


@functools.cache
def _schema() -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for layer in [*_LAYER_LIST, *_MERGE_LIST]:
        layers[layer.name] = {
            "args": {
                a.name: {
                    "type": a.type.name,
                    "required": a.required,
                    "default": None if a.required else _json_default(a.default),
                }
                for a in layer.args
            },
            "inferred": list(layer.inferred),
            "inputs": "2+" if layer.inputs is None else layer.inputs,
        }
    description = "\n".join(
        [
            "Layer types: `type` is case-insensitive and underscores are optional "
            "(`Conv2d`, `conv2d`, `LeakyReLU`, `leaky_relu`). Other keys are the arguments of "
            "the torch.nn class; those inferred from the input shape may be left out. "
            "Shapes count the batch dim first.",
            "",
            *(_describe(layer) for layer in _LAYER_LIST),
            "",
            "Merge ops (graph models only; `in` lists the inputs):",
            "",
            *(_describe(layer) for layer in _MERGE_LIST),
        ]
    )
    return {"description": description, "layers": layers}


def layer_schema() -> dict[str, Any]:
    """Every layer type and merge op with its arguments: text for people, a table for tools."""
    return copy.deepcopy(_schema())
