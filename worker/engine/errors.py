"""Errors a person can act on: each names a JSON path, what was found and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class SpecIssue:
    path: str  # "model.nodes[3].in"; "" for the document itself
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class SpecError(ValueError):
    """A job spec that cannot run. Holds every problem found, each with its path."""

    def __init__(self, issues: Sequence[SpecIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def at(cls, path: str, message: str) -> SpecError:
        return cls([SpecIssue(path, message)])

    @classmethod
    def from_validation(cls, exc: ValidationError, document: Any = None) -> SpecError:
        """Turn pydantic's errors into SpecIssues with clean JSON paths.

        Union and discriminator tags that pydantic puts into `loc` are dropped
        by walking the input document: a loc part that is not a key or index of
        the value at that point is a tag, not a place.
        """
        grouped: dict[str, list[Any]] = {}
        for error in exc.errors(include_url=False):
            path = _clean_path(error["loc"], document)
            grouped.setdefault(path, []).append(error)
        issues = [SpecIssue(path, _describe(errors)) for path, errors in grouped.items()]
        return cls(issues)


class DataError(ValueError):
    """A dataset that does not fit the spec (missing field, bad shape, bad values)."""


def format_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    near = closest(name, choices)
    return f" (closest: {', '.join(near)})" if near else ""


def _clean_path(loc: tuple[Any, ...], document: Any) -> str:
    if document is None:
        return format_path(part for part in loc if isinstance(part, int | str))
    parts: list[str | int] = []
    node: Any = document
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if (isinstance(node, dict) and isinstance(part, str) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            parts.append(part)
            node = node[part]  # type: ignore[index]  # a key of a dict or index of a list
        elif last and isinstance(node, dict) and isinstance(part, str) and _is_field_name(part):
            # a missing or unknown key: the path ends here
            parts.append(part)
        # else: a union/discriminator tag such as "str", "SplitSpec", "step"
    return format_path(parts)


def _is_field_name(part: str) -> bool:
    return part.isidentifier() and part.islower() and part not in _TYPE_TAGS


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "literal"}


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "literal_error": None,
}


def _describe(errors: list[dict[str, Any]]) -> str:
    if len(errors) > 1 and all(e["type"] in _TYPE_WORDS for e in errors):
        expected: list[str] = []
        for e in errors:
            word = _TYPE_WORDS[e["type"]] or e["msg"].removeprefix("Input should be ")
            if word not in expected:
                expected.append(word)
        return f"expected {' or '.join(expected)}, found {_show(errors[0].get('input'))}"
    return "; ".join(dict.fromkeys(_describe_one(e) for e in errors))


def _describe_one(error: dict[str, Any]) -> str:
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "missing":
        return "missing (required)"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("value_error", "assertion_error"):
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if _TYPE_WORDS.get(kind):
        return f"expected {_TYPE_WORDS[kind]}, found {_show(error.get('input'))}"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "missing 'type'"
    msg = msg[0].lower() + msg[1:] if msg else msg
    if "input" in error and not isinstance(error["input"], dict | list):
        return f"{msg}, found {_show(error['input'])}"
    return msg


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
