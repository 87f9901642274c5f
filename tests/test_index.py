"""`pipeline.index` and `scan-pipe index build`: what an index holds, resume after a kill, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from search_fixtures import scan_checkpoint
from synthetic import SyntheticDataset, make_synthetic_dataset
from typer.testing import CliRunner

from pipeline.checkpoint import load_checkpoint
from pipeline.index.build import build_index
from pipeline.index.meta import SearchIndexError, read_meta
from pipeline.index.reader import SearchIndex
from pipeline.index.shards import ShardSet, shard_dir
from pipeline.index.tokens import ImageTokenLists
from pipeline.loaders import open_feature_table
from pipeline.store import METADATA_KEY, STORE_FORMAT, store_schema
from stages import index as index_stage

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SHARD = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("index-data"),
        splits={"train": 20, "val": 5, "test": 20},
        img_dim=16,
        num_concepts=10,
        variable_regions=True,
    )


@pytest.fixture(scope="module")
def other_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("other-data")
    return make_synthetic_dataset(root, splits={"test": 6}, img_dim=16, num_concepts=10, seed=1).features_dir


@pytest.fixture(scope="module")
def checkpoint(data: SyntheticDataset) -> Path:
    return scan_checkpoint(data.root / "ckpt", data)


def _build(data: SyntheticDataset, checkpoint: Path, out: Path, **options):
    return build_index(
        checkpoint,
        data.features_dir,
        out,
        shard_size=SHARD,
        captions=data.captions["test"],
        cache_dir=data.root / "cache",
        progress=False,
        device="cpu",
        **options,
    )


@pytest.fixture(scope="module")
def built(data: SyntheticDataset, checkpoint: Path) -> Path:
    out = data.root / "index"
    _build(data, checkpoint, out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "index.json"
    }


def test_index_holds_the_encoders_output_as_float16(
    built: Path, data: SyntheticDataset, checkpoint: Path
) -> None:
    meta = read_meta(built)
    table = open_feature_table(data.features_dir, data.root / "cache")
    assert meta.complete and meta.kind == "tokens" and meta.num_images == len(table) == 45
    assert meta.num_captions == 100 and meta.shard_size == SHARD
    shards = ShardSet(built / "images", meta.num_images, SHARD)
    assert shards.num_shards == 6
    model, _ = load_checkpoint(checkpoint)
    for position in (0, 7, 8, 44):
        regions = torch.from_numpy(np.array(table.features(position), dtype=np.float32))[None]
        with torch.no_grad():
            expected = model.eval().encode_images(regions, torch.tensor([regions.shape[1]]))[0]
        stored = shards.rows(position)
        assert stored.dtype == np.float16 and stored.shape == tuple(expected.shape)
        np.testing.assert_array_equal(stored, expected.numpy().astype(np.float16))
        assert shards.item_field("ids", [position]) == [table.image_id(position)]


def test_inverted_lists_match_the_region_codes(built: Path) -> None:
    lists = ImageTokenLists(built / "tokens")
    meta = read_meta(built)
    assert lists.nlist == meta.stats["images_nlist"] and lists.num_images == meta.num_images
    pairs = {
        (int(c), image) for image in range(lists.num_images) for c in lists.codes[image] if c < lists.nlist
    }
    listed = {
        (centroid, int(image))
        for centroid in range(lists.nlist)
        for image in lists.items[lists.offsets[centroid] : lists.offsets[centroid + 1]]
    }
    assert pairs == listed
    assert int((np.asarray(lists.codes) < lists.nlist).sum()) == meta.stats["regions"]


def test_a_killed_build_resumes_at_the_first_missing_shard(
    data: SyntheticDataset, checkpoint: Path, built: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"

    def die_after_shard_1(side: str, shard: int) -> None:
        if side == "images" and shard == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        _build(data, checkpoint, out, on_shard=die_after_shard_1)
    assert not read_meta(out).complete
    assert sorted(p.name for p in (out / "images").iterdir()) == ["shard-00000", "shard-00001"]
    with pytest.raises(SearchIndexError, match="did not finish"):
        SearchIndex.open(out)
    (out / "images" / ".shard-00002.tmp-deadbeef").mkdir()  # what a kill mid-write leaves
    first = shard_dir(out / "images", 0).stat().st_mtime_ns
    report = _build(data, checkpoint, out)
    assert report.reused == {"images": 2} and report.written == {"images": 4, "captions": 13}
    assert shard_dir(out / "images", 0).stat().st_mtime_ns == first
    assert not list((out / "images").glob(".shard-*"))
    assert read_meta(out).complete
    assert _files(out) == _files(built)  # the same bytes as an uninterrupted build
    again = _build(data, checkpoint, out)
    assert again.already_complete and again.written == {}


def test_a_build_started_from_other_inputs_is_refused(
    data: SyntheticDataset, checkpoint: Path, built: Path, other_store: Path, tmp_path: Path
) -> None:
    other = scan_checkpoint(tmp_path / "other", data, seed=1)
    with pytest.raises(SearchIndexError, match=r"built from checkpoint .*ckpt.* not checkpoint .*other"):
        _build(data, other, built)
    with pytest.raises(SearchIndexError, match="shard_size 8, not 4"):
        build_index(
            checkpoint, data.features_dir, built, shard_size=4, captions=data.captions["test"],
            cache_dir=data.root / "cache", progress=False,
        )  # fmt: skip
    with pytest.raises(SearchIndexError, match=r"started with captions .*not captions"):
        build_index(
            checkpoint, data.features_dir, built, shard_size=SHARD, captions=data.captions["val"],
            cache_dir=data.root / "cache", progress=False,
        )  # fmt: skip
    with pytest.raises(SearchIndexError, match=r"built from feature store .* not feature store .*other-data"):
        build_index(
            checkpoint, other_store, built, shard_size=SHARD, captions=data.captions["test"],
            cache_dir=tmp_path / "cache", progress=False,
        )  # fmt: skip
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SearchIndexError, match="is not a search index"):
        _build(data, checkpoint, tmp_path / "busy")


def test_opening_with_another_checkpoint_or_store_names_both(
    data: SyntheticDataset, built: Path, other_store: Path, tmp_path: Path
) -> None:
    other = scan_checkpoint(tmp_path / "other", data, seed=1)
    with pytest.raises(SearchIndexError) as caught:
        SearchIndex.open(built, checkpoint=other)
    assert "ckpt" in str(caught.value) and str(other) in str(caught.value)
    with pytest.raises(SearchIndexError) as caught:
        SearchIndex.open(built, features=other_store)
    assert str(data.features_dir) in str(caught.value) and str(other_store) in str(caught.value)
    copied = tmp_path / "copied"
    shutil.copytree(data.features_dir, copied)  # same parts, sizes and times: the same store, moved
    assert SearchIndex.open(built, features=copied).features == copied
    with pytest.raises(SearchIndexError, match="not a search index"):
        SearchIndex.open(tmp_path)
    assert SearchIndex.open(built).features == data.features_dir


def _empty_store(root: Path) -> Path:
    root.mkdir(parents=True)
    schema = store_schema("float16", 16).with_metadata(
        {
            METADATA_KEY: json.dumps(
                {"feature_dim": 16, "feature_dtype": "float16", "store_format": STORE_FORMAT}
            )
        }
    )
    pq.write_table(pa.Table.from_pylist([], schema=schema), root / "part-0-00000.parquet")
    return root


def test_an_empty_store_gives_an_empty_index_that_search_refuses(
    data: SyntheticDataset, checkpoint: Path, tmp_path: Path
) -> None:
    store = _empty_store(tmp_path / "empty-store")
    report = build_index(checkpoint, store, tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False)
    assert report.meta.complete and report.meta.num_images == 0
    with pytest.raises(SearchIndexError, match="holds no images"):
        SearchIndex.open(tmp_path / "idx")


def _app() -> typer.Typer:
    app = typer.Typer()
    index_stage.register(app)
    return app


def _invoke(runner: CliRunner, args: list[str]):
    """The result and its output with rich's line wrapping undone."""
    result = runner.invoke(_app(), args)
    return result, " ".join(result.output.split())


def test_cli_index_build(data: SyntheticDataset, checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "index", "build", "--checkpoint", str(checkpoint), "--features", str(data.features_dir),
        "--out", str(tmp_path / "cli"), "--shard-size", "16", "--cache-dir", str(data.root / "cache"),
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    result, output = _invoke(runner, args)
    assert result.exit_code == 0, output
    assert "45 images" in output and "3 shard(s) written" in output
    result, output = _invoke(runner, args)
    assert result.exit_code == 0 and "already complete" in output
    result, output = _invoke(runner, [*args[:3], str(tmp_path / "nope"), *args[4:]])
    assert result.exit_code == 1 and "--checkpoint not found" in output
    other = scan_checkpoint(tmp_path / "other", data, seed=1)
    result, output = _invoke(runner, [*args[:3], str(other), *args[4:]])
    assert result.exit_code == 1 and "Traceback" not in output
    assert output.startswith("error:") and str(other) in output and str(checkpoint) in output


def test_centroid_count_rule() -> None:
    from pipeline.index.kmeans import default_nlist

    rows = (0, 300, 18_000, 144_000, 9_000_000, 36_000_000)
    assert [default_nlist(count) for count in rows] == [1, 4, 256, 512, 4096, 4096]
