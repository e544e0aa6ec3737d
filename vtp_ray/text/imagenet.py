"""ImageNet zero-shot data: the 1000 OpenAI class names and the 80 OpenAI prompt templates.

Both come from open_clip's ``zero_shot_metadata``, the lists upstream VTP's ``tools/test_zero_shot_hf.py`` uses
(class index = the sorted order of the synset directories of ImageNet val).
"""

from __future__ import annotations

__all__ = ["imagenet_classnames", "imagenet_templates", "resolve_template_set"]


def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 class names, in class-index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def imagenet_templates() -> tuple[str, ...]:
    """The 80 templates as ``{}`` format strings (open_clip holds them as functions of the class name)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def resolve_template_set(name: str) -> tuple[str, ...]:
    """A named template set of ``prompts.TEMPLATE_SETS``."""
    from .prompts import DEFAULT_TEMPLATES

    if name == "default":
        return DEFAULT_TEMPLATES
    if name == "imagenet":
        return imagenet_templates()
    raise ValueError(f"unknown template set {name!r}: choose default or imagenet")
