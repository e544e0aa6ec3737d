"""ARCHITECTURE.md's module index is the one index of the code: it lists every module of ``vtp_ray/`` and
``deployments/`` (and the files they ship), and nothing that is not there."""

from __future__ import annotations

import re

from helpers import ROOT

PACKAGES = ("vtp_ray", "deployments")


def indexed_paths() -> set[str]:
    """The paths of the tree in the fenced block under ``## Modules`` (two spaces of indentation per level)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"## Modules\n.*?```\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no '## Modules' tree"
    parents: list[str] = []
    paths = set()
    for line in block.group(1).splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or line[len(match.group(1)) :].startswith(" "):
            continue
        depth = len(match.group(1)) // 2
        name = match.group(2)
        if depth > len(parents):  # a continuation line of a description
            continue
        parents = parents[:depth]
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
        else:
            paths.add("/".join([*parents, name]))
    return paths


def shipped_files() -> set[str]:
    """Every module of the packages, and the data files they ship."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith((".pyc", ".egg-info"))
    }


def test_the_index_lists_every_module_and_only_those() -> None:
    indexed, shipped = indexed_paths(), shipped_files()
    assert sorted(shipped - indexed) == [], "modules missing from ARCHITECTURE.md's index"
    assert sorted(indexed - shipped) == [], "ARCHITECTURE.md's index lists files that do not exist"
    assert all((ROOT / path).is_file() for path in indexed)
