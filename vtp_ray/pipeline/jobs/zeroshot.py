"""``vtp-ray eval --task zero-shot``: CLIP zero-shot classification accuracy over an ImageFolder tree.

As upstream VTP's ``tools/test_zero_shot_hf.py`` does it: class index = the sorted order of the first-level
directories (ImageNet val's synsets), class names (the 1000 OpenAI ImageNet names by default, or ``classnames``),
the text classifier built once per job from prompt templates (OpenAI's 80 ImageNet templates by default: per
class, the mean of the normalized template embeddings, renormalized; by one task on a replica's resources, or by the
Serve app's replicas, and kept in a disk cache keyed by the model, the class names and the templates: see
``classifier``), image embeddings through the replica pool,
top-1 / top-5 accuracy. Images that cannot be loaded and images outside a class directory are error rows with their
reason.

From sample sources (``sources.samples``: webdataset shards, parquet with image bytes), the class index is the sample's
integer label (the ``cls`` member / ``label`` column, as ImageNet webdataset shards store 0..999) and the class
names are one per line in index order (default the 1000 ImageNet names); a sample without a valid index is an
error row (``no_label`` / ``bad_label``). Outputs are then ordered by file, then key.

Output directory: ``report.json`` (the eval report format, ``task: zero-shot``) and ``per_image.parquet`` (path,
label, target, prediction, top5, top5_probabilities, correct_top1, correct_top5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ... import __version__
from ..report import PER_IMAGE, REPORT, input_counts, run_header, sort_by_path
from ..runner import Placement, ReplicaUsage, run_pipeline
from ..sources import SampleSource, find_source, sample_sort_key
from ..spec import ModelFacts, PipelineSpec
from ..stages import fixed_size_lists
from ..worker import ModelStage

__all__ = ["TOP_K", "ZeroShotWorker", "load_classnames", "load_sample_classnames", "zero_shot_dataset"]

log = logging.getLogger(__name__)

TASK = "zero-shot"
TOP_K = 5


class ZeroShotWorker(ModelStage):
    """The model stage: embeds and scores each batch of images against the job's classifier ``(C, D)``."""

    def __init__(self, *, classifier: np.ndarray, **base: Any) -> None:
        super().__init__(**base)
        self.classes = len(classifier)
        self.classifier = classifier

    def process(self, images: np.ndarray, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return self.replica.classify(images, self.classifier).top(TOP_K)

    def columns(self, batch: pa.Table, valid: np.ndarray, result: tuple[np.ndarray, np.ndarray] | None) -> pa.Table:
        indices, probabilities = result if result is not None else (None, None)
        k = min(TOP_K, self.classes)
        out = batch.drop_columns(["image"])
        out = out.append_column("top5", fixed_size_lists(indices, valid, pa.int32(), (k,)))
        return out.append_column("top5_probabilities", fixed_size_lists(probabilities, valid, pa.float32(), (k,)))


def load_classnames(path: str | os.PathLike[str] | None, directories: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(class directories in index order, their names)``.

    ``path``: None (the 1000 OpenAI ImageNet names for the 1000 sorted synset directories), a text file (one name
    per line, in sorted directory order) or a JSON object mapping directory name -> class name (the classes are
    its keys, sorted, whether or not each directory holds images).
    """
    if path is None:
        from ...text.imagenet import imagenet_classnames

        names = list(imagenet_classnames())
        if len(directories) != len(names):
            raise ValueError(
                f"found {len(directories)} class directories; the ImageNet class names need the 1000 synset "
                "directories of ImageNet val (pass --classnames FILE for another dataset)"
            )
        return list(directories), names
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        mapping = json.loads(text)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"{path}: expected a JSON object mapping directory name -> class name")
        missing = sorted(set(directories) - set(mapping))
        if missing:
            raise ValueError(f"{path} names no class for the directories {missing[:5]}")
        keys = sorted(mapping)
        return keys, [mapping[k] for k in keys]
    names = _lines(text)
    if len(names) != len(directories):
        raise ValueError(f"{path} has {len(names)} class names for {len(directories)} class directories")
    return list(directories), names


def load_sample_classnames(path: str | os.PathLike[str] | None) -> list[str]:
    """The class names of sample sources, in class index order: None (the 1000 OpenAI ImageNet names, for ImageNet
    shards' 0..999) or a text file with one name per line."""
    if path is None:
        from ...text.imagenet import imagenet_classnames

        return list(imagenet_classnames())
    if Path(path).suffix.lower() == ".json":
        raise ValueError(
            f"{path}: a JSON mapping names class directories; samples carry class indices: pass a text file with "
            "one class name per line, in index order"
        )
    names = _lines(Path(path).expanduser().read_text(encoding="utf-8"))
    if not names:
        raise ValueError(f"{path} holds no class names")
    return names


#: Where built classifiers are kept (``$VTP_CACHE_DIR``, else ``~/.cache/vtp-ray``), one .npy per model, class
#: names and templates: ImageNet's 1000 classes x 80 templates cost minutes of text encoding per run otherwise.
CACHE_ENV = "VTP_CACHE_DIR"


def classifier(
    spec: PipelineSpec, model: ModelFacts, placement: Placement, names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """The job's text classifier ``(C, D)``, built once for all its workers: from the disk cache, else by the app's
    replicas (a job on a Serve app) or by one task with a replica's resources, which prints its progress."""
    import ray

    identity = [__version__, model.identity(spec), list(names), list(templates)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vtp-ray") / "class-embeddings" / f"{key}.npy"
    if path.is_file():
        log.info("class embeddings of %d classes from the cache %s", len(names), path)
        return np.load(path)
    what = f"class embeddings ({len(names)} classes x {len(templates)} templates)"
    if placement.served is not None:
        from ...text.classifier import ProgressLine, class_embeddings
        from ..served import ServedReplica

        replica = ServedReplica(placement.served, model.identity(spec))
        result = class_embeddings(replica.embed_text, names, templates, progress=ProgressLine(what))
    else:
        build = ray.remote(_build_classifier).options(**placement.options)
        result = ray.get(build.remote(spec, placement.device, names, templates, what))
    try:  # the cache is a convenience: a read-only home changes nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, result)
        tmp.replace(path)
    except OSError as e:
        log.warning("class embeddings not cached (%s)", e)
    return result


def _build_classifier(
    spec: PipelineSpec, device: str, names: Sequence[str], templates: Sequence[str], what: str
) -> np.ndarray:
    """The classifier, in a task with a replica's resources (its prints reach the job's console)."""
    from ...replica import VTPReplica
    from ...text.classifier import ProgressLine, class_embeddings
    from ..worker import replica_cpu_threads

    replica = VTPReplica(spec.model, device, spec.precision, spec.rope_dtype, warmup_size=0,
                         cpu_threads=replica_cpu_threads(spec.cpu_threads, device))  # fmt: skip
    return class_embeddings(replica.embed_text, names, templates, progress=ProgressLine(what))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def zero_shot_dataset(
    inputs: str | Sequence[str],
    output: str | os.PathLike[str],
    spec: PipelineSpec,
    *,
    classnames: str | os.PathLike[str] | None = None,
    template_set: str = "imagenet",
) -> dict[str, Any]:
    """Zero-shot top-1 / top-5 accuracy (percent) of ``spec.model`` over the ImageFolder tree(s) ``inputs``, or
    over webdataset shards / parquet files with image bytes whose labels are class indices (``sources.samples``).

    Returns the report (also written to ``output/report.json``, next to ``per_image.parquet``).
    """
    from ...text.imagenet import resolve_template_set
    from ...text.tokenizer import TEXT_INSTALL, MissingTextDependencyError, available

    if not available():  # checked here, before Ray starts: every worker would fail on it
        raise MissingTextDependencyError(f"zero-shot evaluation needs open_clip: {TEXT_INSTALL}")
    started = time.perf_counter()
    templates = resolve_template_set(template_set)
    spec = replace(spec, labels_from_dirs=True)  # files: the class is the directory
    source = find_source(inputs, spec)
    if isinstance(source, SampleSource):  # the label is the class index, checked as the samples are read
        names = load_sample_classnames(classnames)
        index = {str(i): i for i in range(len(names))}
        source = replace(source, options=replace(source.options, class_ids=True, num_classes=len(names)))
        samples, found, order = source, None, sample_sort_key
    else:
        labels = source.table.column("label").to_pylist()
        directories, names = load_classnames(classnames, sorted({label for label in labels if label is not None}))
        index = {d: i for i, d in enumerate(directories)}
        samples, found, order = None, source, source.position()
    model = ModelFacts.of(spec.model, spec.preprocessing.size)

    def prepare(placement: Placement) -> dict[str, Any]:
        return {"classifier": classifier(spec, model, placement, tuple(names), templates)}

    usage, rows, errors = ReplicaUsage(), [], []
    with run_pipeline(spec, source, ZeroShotWorker, model, prepare=prepare) as (placement, batches):
        for batch in batches:
            usage.add(batch)
            failed = batch.column("error").is_valid()
            errors.extend(batch.filter(failed).select(["path", "reason", "error"]).to_pylist())
            ok = batch.filter(pc.invert(failed))
            rows.append(ok.select(["path", "label", "top5", "top5_probabilities"]))
    seconds = time.perf_counter() - started

    table = pa.concat_tables(rows).combine_chunks() if rows else None
    per_image = _per_image(table, index, order, errors)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(per_image, out / PER_IMAGE)
    n = per_image.num_rows
    metrics = {
        name: round(100 * float(np.mean(per_image.column(f"correct_{name}").to_numpy(zero_copy_only=False))), 4)
        if n
        else None
        for name in ("top1", "top5")
    }
    report = {
        **run_header(inputs, model, spec, placement),
        "task": TASK,
        "classes": len(names),
        "classnames": str(classnames) if classnames else "imagenet (OpenAI's 1000 names)",
        "template_set": template_set,
        "templates": len(templates),
        **({"source": samples.description()} if samples else {}),
        "metric_definitions": {
            "top1": "percent of evaluated images whose best class is the target (class index = "
            + ("the sample's label)" if samples else "sorted directories)"),
            "top5": "percent of evaluated images whose target is among the 5 best classes",
        },
        "counts": {
            **input_counts(found, usage.processed),
            "evaluated": n,
            "errors": len(errors),
            "errors_by_reason": dict(Counter(e["reason"] for e in errors)),
        },
        "metrics": metrics,
        "skipped_metrics": {},
        "errors": sorted(errors, key=lambda e: order(e["path"])),
        "replicas": usage.stats()["replicas"],
        "replica_model_s": usage.stats()["replica_model_s"],
        "compile": {
            "mode": spec.compile,
            "compiled_rows": usage.stats()["compiled_rows"],
            "eager_rows": usage.stats()["eager_rows"],
        },
        "seconds": round(seconds, 3),
        "images_per_s": round(usage.stats()["processed"] / seconds, 3),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, default=list) + "\n")
    return report


def _per_image(
    table: pa.Table | None, index: dict[str, int], order: Callable[[str], Any], errors: list[dict[str, Any]]
) -> pa.Table:
    """The per-image rows sorted by ``order`` (of the path); images outside a class directory move to ``errors``."""
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("target", pa.int32()),
            ("prediction", pa.int32()),
            ("top5", pa.list_(pa.int32())),
            ("top5_probabilities", pa.list_(pa.float32())),
            ("correct_top1", pa.bool_()),
            ("correct_top5", pa.bool_()),
        ]
    )
    if table is None or not table.num_rows:
        return schema.empty_table()
    labels = table.column("label").to_pylist()
    known = np.array([label in index for label in labels])
    for path in np.array(table.column("path").to_pylist(), object)[~known]:
        errors.append({"path": path, "reason": "no_class", "error": "not inside a class directory"})
    table = table.filter(pa.array(known))
    table = sort_by_path(table, order)
    target = np.array([index[label] for label in table.column("label").to_pylist()], np.int32)
    top = table.column("top5").combine_chunks()
    k = top.type.list_size
    top5 = top.values.to_numpy(zero_copy_only=False).reshape(-1, k)
    probabilities = table.column("top5_probabilities").combine_chunks()
    return pa.table(
        {
            "path": table.column("path"),
            "label": table.column("label"),
            "target": target,
            "prediction": top5[:, 0],
            "top5": pa.array(list(top5), pa.list_(pa.int32())),
            "top5_probabilities": pa.array(
                list(probabilities.values.to_numpy(zero_copy_only=False).reshape(-1, k)), pa.list_(pa.float32())
            ),
            "correct_top1": top5[:, 0] == target,
            "correct_top5": (top5 == target[:, None]).any(axis=1),
        },
        schema=schema,
    )
