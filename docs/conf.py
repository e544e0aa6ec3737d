"""The vtp-ray documentation: Sphinx with MyST-Parser (Markdown pages) and the furo theme.

Build it strictly, as CI does (``tests/test_docs_build.py``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Why Sphinx + MyST (and not MkDocs): it is what Ray's own documentation uses, it is maintained, and its strict
mode catches what a docs site most often gets wrong. With ``-W`` every warning fails the build, and MyST warns
(``myst.xref_missing``) on a link to a page that does not exist, on a ``#anchor`` that no heading of the target
page has (``myst_heading_anchors`` below gives headings GitHub's anchors, so the same links work on GitHub) and on
a link to a repository file that does not exist. MkDocs itself has had no release since 1.6.1, and its ``--strict``
ignores broken anchors unless link and anchor validation are configured to warn.

Links to repository files outside ``docs/`` (``../examples/cluster/start_node.sh``, ``../serve_config.yaml``) are
plain relative Markdown links. On GitHub they open the file; MyST turns each into a Sphinx download link, so the
built site carries a copy of the file (no public repository URL needed) and a path that does not exist fails the
build. The one include is ``architecture.md``, which includes ``ARCHITECTURE.md`` so that the module index exists
once (``tests/test_architecture.py`` checks it against the tree).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the version pyproject.toml declares (a regex: tomllib needs Python 3.11, the project supports 3.10)
_version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)

project = "vtp-ray"
release = version = _version.group(1) if _version else "unknown"
author = "vtp-ray contributors"
copyright = "vtp-ray contributors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# GitHub-style anchors for headings down to ####, so that `page.md#a-heading` links resolve (and are checked).
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"vtp-ray {release}"
html_static_path: list[str] = []
# Pygments has no lexer for some fence names used for plain text: none is needed.
highlight_language = "none"
