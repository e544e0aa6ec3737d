"""Sources without Ray: loose files (directories, globs, manifests), sample files (tar shards, parquet image bytes),
locations, class labels, and the loose files' read stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import jpeg_bytes, png_bytes, random_image, sample_images, write_parquet, write_shards
from PIL import Image

from vtp_ray.images import ImageLimits, preprocess
from vtp_ray.pipeline import Preprocessing, SampleOptions
from vtp_ray.pipeline.sources import (
    BadLabel,
    InputError,
    NoLabel,
    class_id,
    discover_inputs,
    find_samples,
    sample_sort_key,
    source_of,
)
from vtp_ray.pipeline.sources.files import preprocess_rows
from vtp_ray.pipeline.sources.locations import glob_regex, read_bytes
from vtp_ray.pipeline.stages import pixels


def _image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _image(root / "b_class" / "2.png")
    _image(root / "a_class" / "1.jpg")
    _image(root / "a_class" / "deep" / "er" / "3.JPEG")
    _image(root / "top.webp")
    _image(root / ".cache" / "hidden.jpg")  # hidden directory: skipped
    _image(root / "a_class" / "._1.jpg")  # macOS resource fork: skipped
    (root / "a_class" / "notes.txt").write_text("not an image")
    return root


def _paths(inputs) -> list[str]:
    return inputs.table.column("path").to_pylist()


# ------------------------------------------------------------------------------------------ loose files


@pytest.mark.parametrize("uri", [False, True])
def test_a_read_stops_one_byte_past_the_limit(tmp_path: Path, uri: bool):
    data = bytes(range(256)) * 40
    path = tmp_path / "image.jpg"
    path.write_bytes(data)
    name = path.as_uri() if uri else str(path)
    assert read_bytes(name, None, len(data)) == read_bytes(name, None, 10**9) == data
    assert read_bytes(name, None, 100) == data[:101]  # enough for the loader to say the file is too large
    assert read_bytes(name, None, 0) == data[:1]


def test_a_directory_is_searched_recursively_for_images_with_first_level_labels(tree: Path):
    inputs = discover_inputs(str(tree), labels_from_dirs=True)
    assert _paths(inputs) == [
        str(tree / "a_class" / "1.jpg"),
        str(tree / "a_class" / "deep" / "er" / "3.JPEG"),
        str(tree / "b_class" / "2.png"),
        str(tree / "top.webp"),
    ]
    assert inputs.table.column("label").to_pylist() == ["a_class", "a_class", "b_class", None]
    assert discover_inputs(str(tree)).table.column("label").null_count == 4


def test_globs_match_within_a_component_and_across_with_double_star(tree: Path):
    assert _paths(discover_inputs(str(tree / "*" / "*.jpg"))) == [str(tree / "a_class" / "1.jpg")]
    assert _paths(discover_inputs(str(tree / "**" / "*.png"))) == [str(tree / "b_class" / "2.png")]
    labelled = discover_inputs(str(tree / "**" / "*.JPEG"), labels_from_dirs=True)
    assert labelled.table.column("label").to_pylist() == ["a_class"]
    assert glob_regex("a/[!x]?.jpg").match("a/y1.jpg") and not glob_regex("a/*.jpg").match("a/b/c.jpg")


def test_manifests_resolve_relative_paths_against_their_directory(tree: Path, tmp_path: Path):
    (tree / "list.txt").write_text("# a comment\na_class/1.jpg\n\nb_class/2.png\n")
    assert _paths(discover_inputs(str(tree / "list.txt"))) == [str(tree / "a_class/1.jpg"), str(tree / "b_class/2.png")]

    (tree / "list.csv").write_text("path,label\na_class/1.jpg,7\n" + f"{tree / 'top.webp'},8\n")
    csv = discover_inputs(str(tree / "list.csv"))
    assert _paths(csv) == [str(tree / "a_class/1.jpg"), str(tree / "top.webp")]
    assert csv.table.column("label").to_pylist() == ["7", "8"]  # labels are strings, whatever the manifest held

    (tree / "list.tsv").write_text("label\tpath\ncat\ta_class/1.jpg\n")
    assert discover_inputs(str(tree / "list.tsv")).table.column("label").to_pylist() == ["cat"]

    pq.write_table(pa.table({"path": ["b_class/2.png"], "label": [3]}), tree / "list.parquet")
    parquet = discover_inputs(str(tree / "list.parquet"))
    assert _paths(parquet) == [str(tree / "b_class/2.png")] and parquet.table.column("label").to_pylist() == ["3"]


def test_repeated_paths_are_kept_once_and_counted(tree: Path):
    (tree / "list.txt").write_text("a_class/1.jpg\n")
    inputs = discover_inputs([str(tree / "a_class"), str(tree / "list.txt"), f"file://{tree}/a_class/1.jpg"])
    assert len(inputs) == 2 and inputs.duplicates == 2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: root / "missing", "no such file"),
        (lambda root: root / "missing" / "*.jpg", "does not exist"),
        (lambda root: (root / "empty.txt").write_text("# nothing\n") and root / "empty.txt", "no input images"),
        (lambda root: (root / "x.xyz").write_bytes(b"?") and root / "x.xyz", "not a directory, glob, manifest"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no input images"),
    ],
)
def test_sources_that_name_no_images_are_refused(tree: Path, make, match: str):
    with pytest.raises(InputError, match=match):
        discover_inputs(str(make(tree)))


def test_a_manifest_without_a_path_column_is_refused(tree: Path):
    (tree / "bad.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(InputError, match="'path' column"):
        discover_inputs(str(tree / "bad.csv"))


# ------------------------------------------------------------------------------------------ sample files


def test_a_shard_directory_skips_img2datasets_sidecars(tmp_path):
    write_shards(tmp_path / "shards", sample_images())
    source = find_samples(str(tmp_path / "shards"), SampleOptions())
    assert source.kind == "webdataset"
    assert [Path(f).name for f in source.files] == ["00000.tar", "00001.tar"]
    glob = find_samples(str(tmp_path / "shards" / "*.tar"), SampleOptions())
    assert glob.files == source.files


def test_parquet_with_image_bytes_is_samples_and_a_path_manifest_is_not(tmp_path):
    write_parquet(tmp_path / "a.parquet", sample_images(2))
    write_parquet(tmp_path / "hub.parquet", sample_images(2), hub=True)
    pq.write_table(pa.table({"path": ["x.jpg"], "label": ["a"]}), tmp_path / "manifest.parquet")
    assert find_samples(str(tmp_path / "a.parquet"), SampleOptions()).image_column == "jpg"
    assert find_samples(str(tmp_path / "hub.parquet"), SampleOptions()).image_column == "image"
    assert find_samples(str(tmp_path / "manifest.parquet"), SampleOptions()) is None
    assert find_samples(str(tmp_path / "hub.parquet"), SampleOptions(key="id")).kind == "parquet"  # struct path


def test_unusable_sample_inputs_are_refused_with_the_reason(tmp_path):
    write_shards(tmp_path / "shards", sample_images(2))
    write_parquet(tmp_path / "a.parquet", sample_images(2))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InputError, match="mix"):
        find_samples([str(tmp_path / "shards"), str(tmp_path / "img")], SampleOptions())
    with pytest.raises(InputError, match="no key column 'id'"):
        find_samples(str(tmp_path / "a.parquet"), SampleOptions(key="id"))


def test_a_sample_identity_names_its_file():
    assert source_of("s3://b/laion/00001.tar#000000042") == "s3://b/laion/00001.tar"
    assert source_of("/d/x#y.parquet#k#1") == "/d/x#y.parquet"
    assert source_of("/d/plain.jpg") == "/d/plain.jpg"
    # by file, then key: not the plain string order, where "a.tar#..." would come after "a.tar0.tar#..."
    paths = ["/d/a.tar0.tar#1", "/d/a.tar#2", "/d/a.tar#10"]
    assert sorted(paths, key=sample_sort_key) == ["/d/a.tar#10", "/d/a.tar#2", "/d/a.tar0.tar#1"]


def test_the_first_samples_are_named_in_file_order_without_decoding(tmp_path):
    expected = write_shards(tmp_path / "shards", sample_images())
    shards = find_samples(str(tmp_path / "shards"), SampleOptions())
    with_image = [p for p in expected if not p.endswith("#pickled")]  # tar order; "pickled" has no image member
    assert shards.first_samples(5) == with_image[:5]  # spans both shards; the broken image counts
    assert shards.first_samples(100) == with_image and shards.first_samples(0) == []
    write_parquet(tmp_path / "a.parquet", sample_images(3))
    write_parquet(tmp_path / "hub.parquet", sample_images(3), hub=True)
    a = str(tmp_path / "a.parquet")
    assert find_samples(a, SampleOptions()).first_samples(2) == [f"{a}#000000000", f"{a}#000000001"]
    hub = find_samples(str(tmp_path / "hub.parquet"), SampleOptions()).first_samples(9)  # the struct's path
    assert [p.rsplit("#", 1)[1] for p in hub] == ["000000000.img", "000000001.img", "000000002.img", "missing.img"]


def test_a_class_id_is_a_non_negative_integer_in_range():
    options = SampleOptions(class_ids=True, num_classes=3)
    assert [class_id(label, options) for label in ("0", " 2\n")] == [0, 2]
    assert class_id("999", SampleOptions(class_ids=True)) == 999  # no bound given
    for label, error, message in (
        (None, NoLabel, "no class label .cls member."),
        ("", NoLabel, "no class label"),
        ("dog", BadLabel, "'dog' .cls member. is not an integer class index"),
        ("-1", BadLabel, "not an integer class index"),
        ("3", BadLabel, "not a class index 0..2"),
    ):
        with pytest.raises(error, match=message):
            class_id(label, options, "cls member")


# --------------------------------------------------------------------------------- the loose files' read


def test_preprocess_turns_every_bad_input_into_an_error_row(tree: Path):
    (tree / "empty.jpg").write_bytes(b"")
    (tree / "text.jpg").write_text("hello")
    big = _image(tree / "big.png", (300, 200))
    good = tree / "a_class" / "1.jpg"
    paths = [str(good), str(tree / "empty.jpg"), str(tree / "text.jpg"), str(big), str(tree / "gone.jpg")]
    batch = pa.table({"path": paths, "label": ["x", None, None, None, None]})
    preprocessing = Preprocessing(32, limits=ImageLimits(max_pixels=50_000))
    out = preprocess_rows(batch, preprocessing=preprocessing, filesystem=None)
    assert out.column("reason").to_pylist() == [None, "empty", "not_an_image", "too_many_pixels", "unreadable"]
    assert out.column("error").null_count == 1 and all(out.column("error").to_pylist()[1:])
    assert out.column("width").to_pylist()[0] == 40 and out.column("height").to_pylist()[0] == 30
    assert out.column("image").type == pa.binary(32 * 32 * 3) and out.column("image").null_count == 4
    assert out.column("label").to_pylist() == ["x", None, None, None, None]


def test_the_preprocessed_column_holds_each_images_pixels_and_nulls_for_errors(tmp_path):
    paths = []
    for i, shape in enumerate([(50, 70), (90, 64), (64, 64)]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(jpeg_bytes(random_image(*shape, seed=i)))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    order = [paths[0], tmp_path / "bad.jpg", paths[1], paths[2]]
    table = pa.table({"path": [str(p) for p in order], "label": ["a", None, "b", None]})
    out = preprocess_rows(table, preprocessing=Preprocessing(32), filesystem=None)
    assert out.column("image").is_null().to_pylist() == [False, True, False, False]
    assert out.column("width").to_pylist() == [70, None, 64, 64]
    assert out.column("reason").to_pylist() == [None, "not_an_image", None, None]
    ok = out.filter(out.column("error").is_null())
    expected = np.stack([preprocess(str(p), 32) for p in paths])
    np.testing.assert_array_equal(pixels(ok.column("image"), 32), expected)
    # An all-valid block: no validity bitmap at all, the same pixels.
    clean = preprocess_rows(table.take([0, 2, 3]), preprocessing=Preprocessing(32), filesystem=None)
    assert clean.column("image").null_count == 0
    np.testing.assert_array_equal(pixels(clean.column("image"), 32), expected)
