"""Job submission: check a spec against the user's datasets on the meta device, then queue it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.dispatch import Dispatcher, queue_for, send_after_commit
from app.field_infos import from_json, to_json
from app.models import Dataset, Job
from app.store import datasets, jobs


@dataclass(frozen=True)
class CheckedSpec:
    spec: Any  # worker.engine.spec.JobSpec
    document: dict[str, Any]
    summary: dict[str, Any]
    inputs: dict[str, Any]  # input name -> FieldInfo
    targets: dict[str, Any]  # output name -> FieldInfo
    datasets: dict[str, Dataset]  # ref as written in the spec -> dataset


def dataset_refs(spec: Any) -> dict[str, str]:
    """JSON path -> dataset id, for every dataset a spec names (the service reads them as ids)."""
    refs = {"data.train": spec.data.train}
    if isinstance(spec.data.validation, str):
        refs["data.validation"] = spec.data.validation
    return refs


def preload() -> None:
    """Import what check_spec needs (torch among it) now, rather than in the first submit
    that reaches this process: the API calls it at start, as the import takes seconds."""
    import worker.engine.build
    import worker.engine.data
    import worker.engine.spec  # noqa: F401


def check_spec(session: Session, user_id: int, body: bytes, settings: Settings) -> CheckedSpec:
    """Everything that can be known before training: schema, datasets, fields, graph, shapes, size.

    Raises SpecError listing the problems with their JSON paths.
    """
    from worker.engine.build import build_model
    from worker.engine.data import resolve_fields
    from worker.engine.errors import DataError, SpecError, SpecIssue
    from worker.engine.spec import parse_spec

    spec = parse_spec(body)
    # parse_spec accepted it, so it is a JSON object; stored as written, NaN refused
    document = json.loads(body, parse_constant=_reject_constant)
    _reject_nul(document)
    if spec.training.epochs > settings.max_epochs:
        raise SpecError.at(
            "training.epochs",
            f"this service runs at most {settings.max_epochs} epochs, found {spec.training.epochs}",
        )
    refs = dataset_refs(spec)
    found = datasets.get_many(session, user_id, set(refs.values()))
    missing = [
        SpecIssue(path, f"no dataset with id {ref!r}; upload one with POST /api/v1/datasets")
        for path, ref in refs.items()
        if ref not in found
    ]
    if missing:
        raise SpecError(missing)
    try:
        inputs, targets = resolve_fields(spec.data, from_json(found[refs["data.train"]].fields))
        if "data.validation" in refs:
            _check_validation_fields(
                spec, from_json(found[refs["data.validation"]].fields), inputs, targets
            )
    except DataError as exc:
        raise SpecError.at("data", str(exc).strip().splitlines()[0]) from None
    built = build_model(spec, inputs, targets, device="meta", max_params=settings.max_params)
    return CheckedSpec(
        spec=spec,
        document=document,
        summary=built.summary.as_dict(),
        inputs=inputs,
        targets=targets,
        datasets={ref: found[ref] for ref in refs.values()},
    )


def _reject_constant(name: str) -> Any:
    from worker.engine.errors import SpecError

    # json accepts NaN and Infinity, but they are not JSON, and the database's JSON refuses them
    raise SpecError.at("", f"{name} is not a JSON number; give a finite number")


def _reject_nul(document: Any) -> None:
    from worker.engine.errors import SpecError, format_path

    # A NUL character is never meaningful in a spec, and PostgreSQL cannot store one.
    # A loop, not recursion: the document may be nested as deep as json allows.
    stack: list[tuple[Any, list[str | int]]] = [(document, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and "\x00" in value:
            raise SpecError.at(format_path(path), "contains a NUL character (\\u0000)")
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise SpecError.at(format_path(path), f"key {key!r} contains a NUL character")
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))


def _check_validation_fields(
    spec: Any, fields: dict[str, Any], inputs: dict[str, Any], targets: dict[str, Any]
) -> None:
    from worker.engine.data import resolve_fields
    from worker.engine.errors import SpecError, SpecIssue

    try:
        val_inputs, val_targets = resolve_fields(spec.data, fields)
    except SpecError as exc:
        raise SpecError(
            [
                SpecIssue("data.validation", f"the validation dataset: {i.message}")
                for i in exc.issues
            ]
        ) from None
    issues = [
        SpecIssue(
            "data.validation",
            f"{name!r} has per-sample shape {tuple(seen[name].shape)} in the validation dataset "
            f"but {tuple(want.shape)} in data.train",
        )
        for seen, expected in ((val_inputs, inputs), (val_targets, targets))
        for name, want in expected.items()
        if name in seen and tuple(seen[name].shape) != tuple(want.shape)
    ]
    if issues:
        raise SpecError(issues)


SOURCES_HEADER = "X-Dataset-Sources"
MAX_SOURCE_CHARS = 1024


def dataset_sources(raw: str | None, spec: Any) -> dict[str, str]:
    """The `X-Dataset-Sources` header of a submit: where each dataset of the spec came
    from, for the record (`{"data.train": "/home/me/digits_train.npz"}`), as a client
    that uploaded local files says. It travels beside the spec, not in it: the stored
    spec stays the engine's JobSpec, the same document `torchyard train` reads."""
    from worker.engine.errors import SpecError

    if not raw:
        return {}
    where = f"header.{SOURCES_HEADER}"
    try:
        sources = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise SpecError.at(where, f"not JSON: {exc}") from None
    if not isinstance(sources, dict):
        raise SpecError.at(where, "expected a JSON object {json path: local path}")
    refs = dataset_refs(spec)
    for key, value in sources.items():
        if key not in refs:
            expected = ", ".join(refs)
            raise SpecError.at(where, f"{key!r} names no dataset of this spec ({expected})")
        if not isinstance(value, str) or not 0 < len(value) <= MAX_SOURCE_CHARS or "\x00" in value:
            raise SpecError.at(
                where, f"{key}: expected a path of 1 to {MAX_SOURCE_CHARS} characters, no NUL"
            )
    return sources


def submit_job(
    session: Session,
    user_id: int,
    body: bytes,
    settings: Settings,
    dispatcher: Dispatcher,
    *,
    sources: str | None = None,
) -> Job:
    """Check, store as `queued`, and send the wake-up once the row is committed.

    `sources` (the X-Dataset-Sources header) is kept in the job's `fields` beside the
    field infos, as `fields["sources"]`: both describe the job's data at submission.
    """
    checked = check_spec(session, user_id, body, settings)
    queue = queue_for(checked.spec, gpu_first=settings.auto_gpu_wait_s > 0)
    fields: dict[str, Any] = {
        "inputs": to_json(checked.inputs),
        "targets": to_json(checked.targets),
    }
    if recorded := dataset_sources(sources, checked.spec):
        fields["sources"] = recorded
    job = jobs.create(
        session,
        user_id=user_id,
        name=checked.spec.name,
        spec=checked.document,
        fields=fields,
        queue=queue,
        max_restarts=checked.spec.max_restarts,
        dataset_ids=[d.id for d in checked.datasets.values()],
        project=checked.spec.project,
        tags=checked.spec.tags,
        note=checked.spec.note,
    )
    for _ in range(checked.spec.resources.nodes):  # a gang: a wake-up for each of its workers
        send_after_commit(session, dispatcher, job.id, queue)
    return job
