"""The CLIP text side: tokenization, prompt templates and ImageNet class names, zero-shot classifiers.

``prompts`` is torch-free (the Serve ingress validates templates with it); ``tokenizer`` and ``imagenet`` load
open_clip (and so torch) and are imported only where the model runs.
"""

from .prompts import DEFAULT_TEMPLATES, TEMPLATE_SETS, check_templates, expand

__all__ = ["DEFAULT_TEMPLATES", "TEMPLATE_SETS", "check_templates", "expand"]
