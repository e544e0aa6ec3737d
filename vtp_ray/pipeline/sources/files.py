"""The inputs of a tokenization job: image paths (and optional labels) found in directories, globs and manifests.

Every input becomes one ``(path, label)`` row. ``path`` is the input's identity everywhere (output rows, error
rows, resuming): an absolute local path, or a URI such as ``s3://bucket/key`` for any filesystem pyarrow
supports. Sources:

- a directory: searched recursively for files with an image extension (hidden files and directories skipped);
  with ``labels_from_dirs`` the first-level sub-directory is the label, as torchvision's ``ImageFolder`` does;
- a glob (``*``, ``?``, ``[...]``; ``**`` spans directories): matching files, whatever their extension;
- a manifest: ``.txt`` / ``.lst`` (one path per line, ``#`` comments), ``.csv`` / ``.tsv`` or ``.parquet`` with a
  ``path`` column and an optional ``label`` column; relative paths are relative to the manifest's directory;
- a single image file.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_SCHEMA",
    "MANIFEST_EXTENSIONS",
    "InputError",
    "Inputs",
    "discover_inputs",
    "read_bytes",
    "resolve_location",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv", ".parquet"})
INPUT_SCHEMA = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("label", pa.string())])

_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(ValueError):
    """An input source that does not exist, cannot be listed, or is not understood."""


@dataclass(frozen=True)
class Inputs:
    """Unique inputs in discovery order (``INPUT_SCHEMA``), and how many repeated paths were dropped."""

    table: pa.Table
    duplicates: int = 0

    def __len__(self) -> int:
        return self.table.num_rows

    def position(self) -> Callable[[str], int]:
        """path -> its index in discovery order: the order of a job's outputs."""
        return {p: i for i, p in enumerate(self.table.column("path").to_pylist())}.__getitem__


# ------------------------------------------------------------------------------------------- locations


def _is_uri(path: str) -> bool:
    scheme = urlsplit(path).scheme
    return len(scheme) > 1 and "://" in path  # a one-letter scheme is a Windows drive letter


# (scheme, netloc) -> (filesystem, how many leading characters of "netloc/path" the filesystem's paths drop).
# pyarrow's S3 / GCS / Azure paths keep the bucket ("bucket/key"), HDFS drops the host ("/path"); learning the
# offset once per filesystem avoids calling FileSystem.from_uri (which may do network round trips) per file.
_URI_FILESYSTEMS: dict[tuple[str, str], tuple[pafs.FileSystem, int]] = {}


def resolve_location(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path, a ``file://`` URI or any URI pyarrow supports."""
    if filesystem is not None:
        return filesystem, path
    if not _is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
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


def _identity(source: str, fs: pafs.FileSystem, inner: str, filesystem: pafs.FileSystem | None) -> str:
    """The ``path`` recorded for a file found at ``inner`` while listing ``source``."""
    if filesystem is not None or isinstance(fs, pafs.LocalFileSystem):
        return inner
    parts = urlsplit(source)
    if inner.startswith("/"):
        return f"{parts.scheme}://{parts.netloc}{inner}"
    return f"{parts.scheme}://{inner}"


def read_bytes(path: str, filesystem: pafs.FileSystem | None, max_bytes: int) -> bytes:
    """Read a file, at most ``max_bytes + 1`` bytes (enough for the decoder to tell it is too large)."""
    fs, inner = resolve_location(path, filesystem)
    with fs.open_input_stream(inner) as stream:
        return stream.read(max_bytes + 1)


# ------------------------------------------------------------------------------------------- discovery


def discover_inputs(
    sources: str | Sequence[str],
    *,
    labels_from_dirs: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> Inputs:
    """Find every input image named by ``sources`` (directories, globs, manifests, image files).

    Paths are sorted within each directory or glob source and kept in order from manifests; a path named twice
    is kept once (first occurrence and its label). ``labels_from_dirs`` applies to directory and glob sources
    (the first directory level below the source's fixed part); manifests carry their own ``label`` column.
    Raises ``InputError`` for a source that is missing or unreadable, or when no input is found at all.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise InputError("no input given: pass directories, globs or manifest files")
    found: dict[str, str | None] = {}
    duplicates = 0
    for source in sources:
        for path, label in _discover_one(str(source), labels_from_dirs, filesystem):
            if path in found:
                duplicates += 1
            else:
                found[path] = label
    if not found:
        raise InputError(
            f"no input images found in {list(sources)} (directories are searched for {sorted(IMAGE_EXTENSIONS)})"
        )
    table = pa.table({"path": list(found), "label": list(found.values())}, schema=INPUT_SCHEMA)
    return Inputs(table, duplicates)


def _discover_one(
    source: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    fs, inner = resolve_location(source, filesystem)
    if _GLOB_CHARS.search(inner):
        return _from_glob(source, fs, inner, labels_from_dirs, filesystem)
    try:
        info = fs.get_file_info(inner)
    except OSError as e:
        raise InputError(f"{source}: cannot access: {e}") from e
    if info.type == pafs.FileType.Directory:
        return _from_directory(source, fs, inner, labels_from_dirs, filesystem)
    if info.type != pafs.FileType.File:
        raise InputError(f"{source}: no such file or directory")
    ext = posixpath.splitext(inner)[1].lower()
    if ext in MANIFEST_EXTENSIONS:
        return _from_manifest(source, fs, inner, filesystem)
    if ext in IMAGE_EXTENSIONS:
        return [(_identity(source, fs, inner, filesystem), None)]
    raise InputError(
        f"{source}: not a directory, glob, manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))}) or image file"
    )


def _list_files(source: str, fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise InputError(f"{source}: cannot list: {e}") from e
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _relative_parts(base: str, path: str) -> list[str]:
    return posixpath.relpath(path, base).split("/") if base else path.split("/")


def _from_directory(
    source: str, fs: pafs.FileSystem, base: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    base = base.rstrip("/")
    for info in _list_files(source, fs, base):
        parts = _relative_parts(base, info.path)
        # Hidden entries are never images here: .ipynb_checkpoints, macOS "._x.jpg" resource forks, ...
        if any(part.startswith(".") for part in parts) or f".{info.extension.lower()}" not in IMAGE_EXTENSIONS:
            continue
        label = parts[0] if labels_from_dirs and len(parts) > 1 else None
        yield _identity(source, fs, info.path, filesystem), label


def _glob_regex(pattern: str) -> re.Pattern[str]:
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


def _from_glob(
    source: str, fs: pafs.FileSystem, pattern: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    components = pattern.split("/")
    first_glob = next(i for i, part in enumerate(components) if _GLOB_CHARS.search(part))
    base = "/".join(components[:first_glob])
    if not base and pattern.startswith("/"):
        base = "/"
    regex = _glob_regex(pattern)
    try:
        base_exists = fs.get_file_info(base or ".").type == pafs.FileType.Directory
    except OSError:
        base_exists = False
    if not base_exists:
        raise InputError(f"{source}: the glob's directory {base or '.'!r} does not exist")
    for info in _list_files(source, fs, base):
        if not regex.match(info.path):
            continue
        parts = _relative_parts(base, info.path)
        if any(part.startswith(".") for part in parts) and not any(p.startswith(".") for p in components[first_glob:]):
            continue  # as the shell does: wildcards do not match hidden names unless the pattern says so
        label = parts[0] if labels_from_dirs and len(parts) > 1 else None
        yield _identity(source, fs, info.path, filesystem), label


def _from_manifest(
    source: str, fs: pafs.FileSystem, inner: str, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    ext = posixpath.splitext(inner)[1].lower()
    try:
        if ext == ".parquet":
            with fs.open_input_file(inner) as f:
                table = pq.read_table(f)
        else:
            with fs.open_input_stream(inner) as stream:
                data = stream.read()
            if ext in (".txt", ".lst"):
                lines = (line.strip() for line in data.decode("utf-8").splitlines())
                paths = [line for line in lines if line and not line.startswith("#")]
                table = pa.table({"path": pa.array(paths, pa.string())})
            else:
                options = pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
                convert = pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()})
                table = pacsv.read_csv(io.BytesIO(data), parse_options=options, convert_options=convert)
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(f"{source}: cannot read manifest: {e}") from e
    if "path" not in table.column_names:
        raise InputError(f"{source}: a manifest needs a 'path' column, found {table.column_names}")
    paths = table.column("path").to_pylist()
    labels = (
        table.column("label").cast(pa.string()).to_pylist() if "label" in table.column_names else [None] * len(paths)
    )
    directory = posixpath.dirname(inner)
    for row, (path, label) in enumerate(zip(paths, labels, strict=True)):
        if not path:
            raise InputError(f"{source}: row {row} has an empty path")
        if _is_uri(path) or filesystem is not None:
            yield path, label  # already names its filesystem, or lives in the one given
        elif os.path.isabs(path):
            yield os.path.normpath(path), label
        else:
            yield _identity(source, fs, posixpath.normpath(posixpath.join(directory, path)), filesystem), label
