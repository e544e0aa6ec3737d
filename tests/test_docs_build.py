"""The docs site builds strictly (``sphinx -W``: any warning fails it), and the configuration makes a broken link, a
broken ``#anchor`` and a link to a repository file that does not exist fail the build (a small project with
``docs/conf.py`` and one of each, built beside the real one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow

BROKEN = """# Broken

[a page that does not exist](nowhere.md), [a heading that does not exist](other.md#no-such-heading),
[a repository file that does not exist](../examples/no-such-script.sh), [one that does](other.md#a-heading).
"""
OTHER = "# Other\n\n## A heading\n\ntext\n"


def _sphinx(source: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(source), str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_docs_build_strictly_and_broken_links_fail_it(tmp_path: Path) -> None:
    # A tree beside the repository's, so that `../examples/...` resolves as it does from docs/.
    broken = tmp_path / "repo" / "docs"
    broken.mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "conf.py", broken / "conf.py")
    shutil.copy(ROOT / "pyproject.toml", broken.parent / "pyproject.toml")
    (broken / "index.md").write_text(BROKEN + "\n```{toctree}\nother\n```\n")
    (broken / "other.md").write_text(OTHER)
    (broken.parent / "examples").mkdir()

    # Both builds at once: most of each is Python's and Sphinx's start-up.
    real, bad = _sphinx(ROOT / "docs", tmp_path / "html"), _sphinx(broken, tmp_path / "broken-html")
    real_output, bad_output = real.communicate(timeout=300)[0], bad.communicate(timeout=300)[0]

    assert real.returncode == 0, f"the docs build has warnings (sphinx -W):\n{real_output[-5000:]}"
    pages = {p.stem for p in (tmp_path / "html").glob("*.html")}
    assert {"index", "serving", "datasets", "results", "architecture"} <= pages
    assert "VTPReplica" in (tmp_path / "html" / "architecture.html").read_text()  # ARCHITECTURE.md, included

    assert bad.returncode != 0
    warnings = [line for line in bad_output.splitlines() if "WARNING" in line]
    assert len(warnings) == 3, bad_output
    assert any("nowhere.md" in w for w in warnings)
    assert any("no-such-heading" in w for w in warnings)
    assert any("no-such-script.sh" in w for w in warnings)
