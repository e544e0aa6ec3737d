"""Text inputs (texts to embed, a classification's labels and templates), checked in the ingress (torch-free)
against the ``text`` limits, so a bad request gets a 422 with a JSON error and never reaches the model's batch queue.
Shared by ``/v1/embed-text``, ``/v1/classify`` and the protocol's ``<model>.embed_text``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vtp_ray.text import DEFAULT_TEMPLATES, TEMPLATE_SETS, check_templates

from .errors import ApiError
from .settings import TextLimits

__all__ = ["check_texts", "classify_options"]


def _invalid(kind: str, message: str) -> ApiError:
    return ApiError(422, kind, message)


def _strings(values: Sequence[Any], what: str, limit: int, max_chars: int) -> tuple[str, ...]:
    if not values:
        raise _invalid(f"no_{what}", f"{what} must be a non-empty list of strings")
    if len(values) > limit:
        raise _invalid(f"too_many_{what}", f"{len(values)} {what} in one request, the limit is {limit}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise _invalid(f"bad_{what}", f"{what}[{i}] is a {type(value).__name__}, not a string")
        if len(value) > max_chars:
            raise _invalid(f"bad_{what}", f"{what}[{i}] has {len(value)} characters, the limit is {max_chars}")
    return tuple(values)


def check_texts(texts: Sequence[Any], limits: TextLimits) -> tuple[str, ...]:
    """Texts to embed, checked against ``limits`` (count and characters per text)."""
    return _strings(texts, "texts", limits.max_texts, limits.max_text_chars)


def _field_list(values: list[str], what: str) -> list[Any]:
    """A field's values: repeated fields, or one field holding a JSON array (``labels=["cat", "dog"]``)."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise _invalid(f"bad_{what}", f"{what}: a value starting with '[' must be a JSON array: {e}") from e
        if not isinstance(parsed, list):
            raise _invalid(f"bad_{what}", f"{what} must be a JSON array of strings")
        return parsed
    return values


def classify_options(fields: dict[str, list[str]], limits: TextLimits) -> tuple[tuple[str, ...], tuple[str, ...] | str]:
    """``(labels, templates)`` of a classification from its fields (query parameters and form fields together).

    ``templates`` is a tuple of ``{}`` templates, or the name of a template set (``template_set``); the default is
    the one template ``"a photo of a {}."``.
    """
    labels = _strings(
        _field_list(fields.get("labels", []), "labels"), "labels", limits.max_labels, limits.max_text_chars
    )
    templates = fields.get("templates", [])
    names = fields.get("template_set", [])
    if templates and names:
        raise _invalid("bad_templates", "send templates or template_set, not both")
    if len(names) > 1 or (names and names[0] not in TEMPLATE_SETS):
        raise _invalid("bad_templates", f"template_set must be one of {', '.join(TEMPLATE_SETS)}, got {names}")
    if names:
        return labels, names[0]
    if not templates:
        return labels, DEFAULT_TEMPLATES
    values = _strings(_field_list(templates, "templates"), "templates", limits.max_templates, limits.max_text_chars)
    try:
        return labels, check_templates(values)
    except ValueError as e:
        raise _invalid("bad_templates", str(e)) from e
