"""Prompt templates: ``"a photo of a {}."`` filled with a class name (torch-free, pure Python)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_TEMPLATES", "TEMPLATE_SETS", "check_templates", "expand"]

#: The one template a request without templates gets.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

#: Template sets selectable by name: ``default`` (one template) and ``imagenet`` (OpenAI's 80 ImageNet templates,
#: which upstream VTP's zero-shot evaluation uses; resolved by ``imagenet.imagenet_templates``).
TEMPLATE_SETS: tuple[str, ...] = ("default", "imagenet")


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple, each a string with exactly one ``{}``; ``ValueError`` names the first bad one."""
    if not templates:
        raise ValueError("templates must not be empty")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"a template must be a string with exactly one '{{}}' for the label, got {template!r}")
    return tuple(templates)


def expand(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: ``[t0(l0), t1(l0), ..., t0(l1), ...]``."""
    return [template.replace("{}", label) for label in labels for template in templates]
