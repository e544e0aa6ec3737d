"""Where input files live: local paths and URIs (any filesystem pyarrow supports), globs, listings and reads.

A file's identity (the ``path`` recorded in every output row, error row and resume check) is an absolute local path,
or a URI such as ``s3://bucket/key``; ``resolve_location`` turns either into ``(filesystem, path inside it)`` and
``file_identity`` turns a listed file back into its identity. Every source format (loose files, tar shards, parquet
files) finds its files through these helpers.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "InputError",
    "file_identity",
    "glob_files",
    "glob_regex",
    "has_glob",
    "is_uri",
    "list_files",
    "read_bytes",
    "relative_parts",
    "resolve_location",
]

_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """An input source that does not exist, cannot be listed, or is not understood."""


def is_uri(path: str) -> bool:
    """Whether ``path`` names its filesystem (``s3://...``, ``file://...``) rather than being a local path."""
    scheme = urlsplit(path).scheme
    return len(scheme) > 1 and "://" in path  # a one-letter scheme is a Windows drive letter


def has_glob(path: str) -> bool:
    """Whether ``path`` holds a glob character (``*``, ``?``, ``[``)."""
    return _GLOB_CHARS.search(path) is not None


# (scheme, netloc) -> (filesystem, how many leading characters of "netloc/path" the filesystem's paths drop).
# pyarrow's S3 / GCS / Azure paths keep the bucket ("bucket/key"), HDFS drops the host ("/path"); learning the
# offset once per filesystem avoids calling FileSystem.from_uri (which may do network round trips) per file.
_URI_FILESYSTEMS: dict[tuple[str, str], tuple[pafs.FileSystem, int]] = {}
_LOCAL = pafs.LocalFileSystem()


def resolve_location(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path, a ``file://`` URI or any URI pyarrow supports."""
    if filesystem is not None:
        return filesystem, path
    if not is_uri(path):
        return _LOCAL, os.path.abspath(os.path.expanduser(path))
    parts = urlsplit(path)
    key = (parts.scheme, parts.netloc)
    rest = path.split("://", 1)[1]
    cached = _URI_FILESYSTEMS.get(key)
    if cached is None:
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"{path}: no filesystem for this URI ({e})") from e
        if isinstance(fs, pafs.LocalFileSystem) or not rest.endswith(inner):
            return fs, inner  # file:// and anything unusual: no shortcut
        cached = _URI_FILESYSTEMS[key] = (fs, len(rest) - len(inner))
    fs, drop = cached
    return fs, rest[drop:]


def file_identity(source: str, fs: pafs.FileSystem, inner: str, filesystem: pafs.FileSystem | None) -> str:
    """The identity (``path``) of a file found at ``inner`` in ``fs`` while listing the input ``source``: the
    path itself for local files and a given ``filesystem``, else a URI of the source's scheme."""
    if filesystem is not None or isinstance(fs, pafs.LocalFileSystem):
        return inner
    parts = urlsplit(source)
    if inner.startswith("/"):
        return f"{parts.scheme}://{parts.netloc}{inner}"
    return f"{parts.scheme}://{inner}"


def read_bytes(path: str, filesystem: pafs.FileSystem | None, max_bytes: int) -> bytes:
    """Read a file, at most ``max_bytes + 1`` bytes (enough for the loader to tell it is too large)."""
    fs, inner = resolve_location(path, filesystem)
    if isinstance(fs, pafs.LocalFileSystem):
        # A stream's read(n) allocates n bytes first: for a 20 kB JPEG, 64 MB taken and given back (33 against 10 us
        # a file). A local file knows its size; a remote one would cost a round trip to ask.
        with fs.open_input_file(inner) as file:
            return file.read(min(file.size(), max_bytes + 1))
    with fs.open_input_stream(inner) as stream:
        return stream.read(max_bytes + 1)


def list_files(source: str, fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    """Every file below ``base`` (recursively), sorted by path; ``InputError`` naming ``source`` if unlistable."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise InputError(f"{source}: cannot list: {e}") from e
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def relative_parts(base: str, path: str) -> list[str]:
    """The components of ``path`` below the directory ``base`` (``""``: the filesystem's root)."""
    return posixpath.relpath(path, base).split("/") if base else path.split("/")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a regex: ``*``, ``?`` and ``[...]`` stay within one path component, ``**`` spans."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[^" + re.escape(body[1:]) + "]" if body[0] == "!" else "[" + re.escape(body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_files(source: str, fs: pafs.FileSystem, pattern: str) -> list[tuple[str, list[str]]]:
    """The files matching the glob ``pattern`` (a path inside ``fs``), sorted: ``(path, its components below the
    pattern's fixed directory)``. As the shell does, wildcards do not match hidden names unless the pattern's own
    components start with a dot. ``InputError`` when the fixed directory does not exist."""
    components = pattern.split("/")
    first_glob = next(i for i, part in enumerate(components) if has_glob(part))
    base = "/".join(components[:first_glob])
    if not base and pattern.startswith("/"):
        base = "/"
    regex = glob_regex(pattern)
    try:
        base_exists = fs.get_file_info(base or ".").type == pafs.FileType.Directory
    except OSError:
        base_exists = False
    if not base_exists:
        raise InputError(f"{source}: the glob's directory {base or '.'!r} does not exist")
    hidden_ok = any(part.startswith(".") for part in components[first_glob:])
    matches = []
    for info in list_files(source, fs, base):
        if not regex.match(info.path):
            continue
        parts = relative_parts(base, info.path)
        if hidden_ok or not any(part.startswith(".") for part in parts):
            matches.append((info.path, parts))
    return matches
