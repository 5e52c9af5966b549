"""Deployable models from trained weights: torch.export `.pt2` and ONNX.

Both keep the batch dimension dynamic, and both are checked against the
PyTorch model on a sample batch before the file is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from worker.engine.build import build_model
from worker.engine.errors import SpecError
from worker.engine.fields import FieldInfo
from worker.engine.files import atomic_path
from worker.engine.spec import JobSpec

ExportFormat = Literal["pt2", "onnx"]


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not match PyTorch."""


def load_trained(spec: JobSpec, inputs: dict[str, FieldInfo], weights: Path) -> Any:
    """Build the spec's model on the CPU and load safetensors weights into it (strictly)."""
    built = build_model(spec, inputs, None, device="cpu")
    model = built.module
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise ExportError(f"{weights.name} is not a readable safetensors file ({exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: weights of another model
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ExportError(f"{weights.name} does not fit this spec's model ({detail})") from None
    if missing or unexpected:
        raise ExportError(
            f"{weights.name} does not fit this spec's model "
            f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})"
        )
    model.eval()
    return built


def sample_inputs(
    built: Any, inputs: dict[str, FieldInfo], batch: int = 3
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for name in built.module.input_names:
        info, dtype = inputs[name], built.input_dtypes[name]
        if dtype == torch.long:
            high = info.num_classes or 2
            out.append(torch.randint(0, high, (batch, *info.shape), generator=generator))
        else:
            out.append(torch.randn((batch, *info.shape), generator=generator))
    return tuple(out)


def export_model(
    spec: JobSpec,
    inputs: dict[str, FieldInfo],
    weights: Path,
    out: Path,
    fmt: ExportFormat,
) -> Path:
    """Write `out` in `fmt`; raise ExportError (one line) when it cannot be done faithfully."""
    built = load_trained(spec, inputs, weights)
    model = built.module
    args = sample_inputs(built, inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # forward(*inputs): the dynamic shapes follow the signature, one dict per input.
    dynamic = {"inputs": tuple({0: batch} for _ in args)}
    with torch.no_grad():
        expected = _flatten(model(*args))
    # The temp file keeps the suffix (torch.export wants .pt2); it only replaces
    # `out` once its outputs match PyTorch's.
    with atomic_path(out) as tmp:
        try:
            if fmt == "pt2":
                program = torch.export.export(model, args, dynamic_shapes=dynamic)
                torch.export.save(program, str(tmp))
                got = _flatten(torch.export.load(str(tmp)).module()(*args))
            else:
                got = _export_onnx(model, args, dynamic, tmp)
        except SpecError:
            raise
        except ImportError as exc:
            raise ExportError(
                f"ONNX export needs the 'onnx' extra: pip install 'torchyard[onnx]' ({exc})"
            ) from None
        except Exception as exc:  # torch.export raises many types; the user needs one line
            first = str(exc).strip().splitlines()
            raise ExportError(
                f"{fmt} export failed: {first[0] if first else type(exc).__name__}"
            ) from None
        for name, (want, have) in enumerate(zip(expected, got, strict=True)):
            if not torch.allclose(want, have, rtol=1e-4, atol=1e-5):
                diff = (want - have).abs().max().item()
                raise ExportError(f"{fmt} export output {name} differs from PyTorch by {diff:.3g}")
    return out


def _export_onnx(
    model: Any, args: tuple[torch.Tensor, ...], dynamic: Any, path: Path
) -> list[torch.Tensor]:
    import onnx  # noqa: F401  (fail early with a clear message when the extra is missing)
    from onnx.reference import ReferenceEvaluator

    names = [f"input_{i}" for i in range(len(args))] if len(args) > 1 else None
    input_names = list(model.input_names)
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=input_names or names,
        output_names=list(model.output_names),
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))
    session = ReferenceEvaluator(str(path))
    feeds = {name: arg.numpy() for name, arg in zip(input_names, args, strict=True)}
    return [torch.from_numpy(value) for value in session.run(None, feeds)]


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return [out[key] for key in out]
    if isinstance(out, list | tuple):
        return list(out)
    return [out]
