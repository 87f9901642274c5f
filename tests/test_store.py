"""Feature store, memory-mapped table, TSV interop and captions tables."""

from __future__ import annotations

import base64
import csv
import gc
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store as store_module
from pipeline import store_repair
from pipeline.captions import CaptionsError, read_captions, write_captions
from pipeline.feature_table import cached_feature_table, index_path
from pipeline.store import (
    PART_PATTERN,
    STORE_FORMAT,
    FeatureStore,
    FeatureStoreError,
    RegionRecord,
    StoreFormatError,
    existing_ids,
)
from pipeline.store_repair import migrate_store
from pipeline.store_writer import FeatureStoreWriter
from pipeline.tsv import TsvError, export_tsv, import_tsv, read_tsv


def make_records(count: int, dim: int = 16, *, seed: int = 0, adaptive: bool = True) -> list[RegionRecord]:
    """Synthetic images with 1..6 regions (adaptive) or 3 regions each; odd images carry class ids."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        n = int(rng.integers(1, 7)) if adaptive else 3
        with_ids = i % 2 == 1
        records.append(
            RegionRecord(
                image_id=f"dir/img_{i:03d}.jpg",
                image_w=int(rng.integers(50, 900)),
                image_h=int(rng.integers(50, 900)),
                boxes=rng.uniform(0, 500, size=(n, 4)).astype(np.float32),
                features=rng.standard_normal((n, dim)).astype(np.float32),
                object_ids=rng.integers(0, 1600, size=n).astype(np.int32) if with_ids else None,
                object_conf=rng.random(n).astype(np.float32) if with_ids else None,
                attribute_ids=rng.integers(0, 400, size=n).astype(np.int32) if with_ids else None,
                attribute_conf=rng.random(n).astype(np.float32) if with_ids else None,
            )
        )
    return records


def write_store(root: Path, records: list[RegionRecord], **kwargs: object) -> None:
    with FeatureStoreWriter(root, **kwargs) as writer:  # type: ignore[arg-type]
        for record in records:
            writer.add(record)


@pytest.mark.parametrize("feature_dtype", ["float16", "float32"])
def test_round_trip_keeps_every_column(tmp_path: Path, feature_dtype: str) -> None:
    records = make_records(11)
    write_store(
        tmp_path / "store",
        records,
        feature_dtype=feature_dtype,
        rows_per_part=4,
        row_group_size=2,
        metadata={"weights_sha256": "abc", "untrained": True},
    )
    store = FeatureStore(tmp_path / "store")
    assert len(store) == 11
    assert store.image_ids == [r.image_id for r in records]
    assert store.feature_dim == 16
    assert store.metadata["feature_dtype"] == feature_dtype
    assert store.metadata["weights_sha256"] == "abc" and store.metadata["untrained"] is True
    got = list(store.iter_records(batch_rows=3))
    assert [r.image_id for r in got] == store.image_ids
    for expected, actual in zip(records, got, strict=True):
        assert actual.features.dtype == np.dtype(feature_dtype)
        np.testing.assert_array_equal(actual.features, expected.features.astype(feature_dtype))
        np.testing.assert_array_equal(actual.boxes, expected.boxes)
        assert (actual.image_w, actual.image_h) == (expected.image_w, expected.image_h)
        assert actual.num_boxes == expected.num_boxes
        for name in ("object_ids", "object_conf", "attribute_ids", "attribute_conf"):
            if getattr(expected, name) is None:
                assert getattr(actual, name) is None
            else:
                np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))
    # streamed arrays are views of the Arrow buffers, not copies
    assert not got[0].features.flags.owndata


def test_parts_row_groups_and_encodings(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_store(root, make_records(12), rows_per_part=5, row_group_size=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["part-0-00000.parquet", "part-0-00001.parquet", "part-0-00002.parquet"]
    metadata = pq.ParquetFile(root / names[0]).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [2, 2, 1]
    schema_names = pq.ParquetFile(root / names[0]).schema_arrow.names
    for g in range(metadata.num_row_groups):
        for c in range(metadata.num_columns):
            column = metadata.row_group(g).column(c)
            top_level = column.path_in_schema.split(".")[0]
            assert top_level in schema_names
            if top_level in ("features", "boxes", "object_conf", "attribute_conf"):
                assert not any("DICTIONARY" in encoding for encoding in column.encodings), column.encodings
    assert pq.ParquetFile(root / names[2]).metadata.num_rows == 2


def test_failed_part_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"

    def broken_write(table: pa.Table, where: Path, **kwargs: object) -> None:
        Path(where).write_bytes(b"half a part")
        raise OSError("disk full")

    monkeypatch.setattr(store_module.pq, "write_table", broken_write)
    writer = FeatureStoreWriter(root, rows_per_part=2)
    writer.add(make_records(1)[0])
    with pytest.raises(OSError, match="disk full"):
        writer.add(make_records(2)[1])
    assert list(root.iterdir()) == []


def test_resumed_and_sharded_writers_never_collide(tmp_path: Path) -> None:
    root = tmp_path / "store"
    records = make_records(9)
    write_store(root, records[:3], rows_per_part=2)
    write_store(root, records[3:6], rows_per_part=2)  # resume, same shard
    write_store(root, records[6:], rows_per_part=2, shard="rank1")
    names = sorted(p.name for p in root.iterdir())
    assert names == [
        "part-0-00000.parquet",
        "part-0-00001.parquet",
        "part-0-00002.parquet",
        "part-0-00003.parquet",
        "part-rank1-00000.parquet",
        "part-rank1-00001.parquet",
    ]
    assert all(PART_PATTERN.match(name) for name in names)
    store = FeatureStore(root)
    assert sorted(store.image_ids) == sorted(r.image_id for r in records)
    assert existing_ids(root) == {r.image_id for r in records}
    assert existing_ids(tmp_path / "not-yet") == set()


def test_duplicate_ids_error_or_keep_first(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = make_records(3, seed=1)
    second = make_records(3, seed=2)  # same ids, other values
    write_store(root, first, shard="a")
    write_store(root, second[1:], shard="b")
    with pytest.raises(FeatureStoreError) as info:
        FeatureStore(root)
    message = str(info.value)
    assert "dir/img_001.jpg" in message and "part-a-00000.parquet" in message and "part-b-00000" in message
    store = FeatureStore(root, duplicates="keep_first")
    assert store.image_ids == [r.image_id for r in first]
    streamed = list(store.iter_records())
    assert len(streamed) == 3
    np.testing.assert_array_equal(streamed[1].features, first[1].features.astype(np.float16))
    table = store.to_mmap(tmp_path / "cache")
    assert len(table) == 3
    np.testing.assert_array_equal(table.features(2), first[2].features.astype(np.float16))


def test_reader_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FeatureStoreError, match=str(missing)):
        FeatureStore(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatureStoreError, match="no part files"):
        FeatureStore(empty)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"image_id": ["x"]}), foreign / "part-0-00000.parquet")
    with pytest.raises(FeatureStoreError, match=r"part-0-00000\.parquet.*scan_pipe"):
        FeatureStore(foreign)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part-0-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(FeatureStoreError, match=r"corrupt/part-0-00000\.parquet"):
        FeatureStore(corrupt)
    wrong_type = tmp_path / "wrong_type"
    write_store(wrong_type, make_records(2))
    part = wrong_type / "part-0-00000.parquet"
    table = pq.read_table(part)
    table = table.set_column(table.schema.get_field_index("num_boxes"), "num_boxes", pa.array(["a", "b"]))
    pq.write_table(table, part)
    with pytest.raises(FeatureStoreError, match="num_boxes"):
        FeatureStore(wrong_type)


def test_writer_rejects_inconsistent_records(tmp_path: Path) -> None:
    writer = FeatureStoreWriter(tmp_path / "store")
    writer.add(make_records(1, dim=8)[0])
    with pytest.raises(ValueError, match="feature dimension"):
        writer.add(make_records(1, dim=9)[0])
    bad_boxes = make_records(1, dim=8)[0]
    bad_boxes.boxes = bad_boxes.boxes[:, :3]
    with pytest.raises(ValueError, match="boxes"):
        writer.add(bad_boxes)
    with pytest.raises(ValueError, match="shard"):
        FeatureStoreWriter(tmp_path / "other", shard="a/b")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("boxes", np.zeros((3, 4), dtype=np.float64)),
        ("object_ids", np.zeros(3, dtype=np.int64)),
        ("object_conf", np.zeros(3, dtype=np.float64)),
        ("features", np.zeros((3, 8), dtype=np.float64)),
    ],
)
def test_writer_checks_dtypes_instead_of_casting(tmp_path: Path, name: str, value: np.ndarray) -> None:
    """Records arrive in the store's dtypes (converted once by their producer); only the feature width may
    differ from the store's, so importers can hand float32 features to a float16 store."""
    record = make_records(1, dim=8, adaptive=False)[0]
    setattr(record, name, value)
    with pytest.raises(ValueError, match=f"{name} must be"):
        FeatureStoreWriter(tmp_path / "store").add(record)


def test_read_specific_rows(tmp_path: Path) -> None:
    records = make_records(10)
    write_store(tmp_path / "store", records, rows_per_part=4, row_group_size=3)
    store = FeatureStore(tmp_path / "store")
    wanted = [records[9].image_id, records[2].image_id, records[5].image_id]
    got = store.read(wanted)
    assert [r.image_id for r in got] == wanted
    for record, index in zip(got, (9, 2, 5), strict=True):
        np.testing.assert_array_equal(record.features, records[index].features.astype(np.float16))
    with pytest.raises(KeyError, match=r"missing\.jpg"):
        store.read(["missing.jpg"])


def test_mmap_table_is_zero_copy_and_cached(tmp_path: Path) -> None:
    records = make_records(9)
    root = tmp_path / "store"
    write_store(root, records, rows_per_part=4, feature_dtype="float32")
    store = FeatureStore(root)
    cache = tmp_path / "cache"
    table = store.to_mmap(cache)
    assert len(table) == 9 and table.image_ids == store.image_ids
    for index, record in enumerate(records):
        view = table.features(index)
        np.testing.assert_array_equal(view, record.features)
        np.testing.assert_array_equal(table.boxes(index), record.boxes)
        assert table.num_boxes(index) == record.num_boxes
        assert table.index_of(record.image_id) == index
        assert table.image_size(index) == (record.image_w, record.image_h)
        assert not view.flags.writeable and not view.flags.owndata
    # the same address twice: views into the map, not fresh copies
    assert table.features(4).ctypes.data == table.features(4).ctypes.data
    padded, lengths = table.gather([3, 0, 7])
    assert padded.dtype == np.float32 and padded.shape == (3, int(lengths.max()), 16)
    for slot, index in enumerate((3, 0, 7)):
        n = records[index].num_boxes
        assert lengths[slot] == n
        np.testing.assert_array_equal(padded[slot, :n], records[index].features)
        assert not padded[slot, n:].any()
    with pytest.raises(KeyError, match="nope"):
        table.index_of("nope")

    # cached: a second call reuses the file; a new part makes it stale, rebuilt, the old file removed
    first_file = table.path
    mtime = first_file.stat().st_mtime_ns
    assert store.to_mmap(cache).path == first_file and first_file.stat().st_mtime_ns == mtime
    write_store(root, make_records(12, seed=5)[9:], rows_per_part=4, feature_dtype="float32", shard="1")
    rebuilt = FeatureStore(root).to_mmap(cache)
    assert rebuilt.path != first_file and not first_file.exists() and len(rebuilt) == 12
    assert sorted(p.name for p in cache.iterdir()) == [rebuilt.path.name, index_path(rebuilt.path).name]

    clone = pickle.loads(pickle.dumps(rebuilt))
    np.testing.assert_array_equal(clone.features(10), rebuilt.features(10))


def _rss_anon_kib() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc (Linux only)")
def test_mmap_access_stays_out_of_anonymous_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim, regions, count = 512, 36, 400  # 29.5 MB of float32 features
    root = tmp_path / "store"
    with FeatureStoreWriter(root, feature_dtype="float32", rows_per_part=100) as writer:
        for i in range(count):
            writer.add(
                RegionRecord(
                    f"{i}",
                    1,
                    1,
                    np.zeros((regions, 4), np.float32),
                    rng.random((regions, dim), dtype=np.float32),
                )
            )
    table = FeatureStore(root).to_mmap(tmp_path / "cache")
    feature_bytes = count * regions * dim * 4
    before = _rss_anon_kib()
    assert before is not None
    total = 0.0
    for index in range(len(table)):
        total += float(table.features(index)[:, 0].sum())
    after = _rss_anon_kib()
    assert after is not None
    assert total > 0
    # touching every feature page costs page cache, not anonymous memory
    assert (after - before) * 1024 < feature_bytes / 4, (before, after, feature_bytes)


# ------------------------------------------------------------------------------- layout, migration, scale


def test_columns_describe_themselves(tmp_path: Path) -> None:
    """Plain Parquet readers get (n, D) arrays from the types alone, with no scan-pipe metadata."""
    records = make_records(5, dim=12)
    write_store(tmp_path / "store", records, feature_dtype="float32", rows_per_part=2)
    table = pq.read_table(tmp_path / "store")
    assert table.schema.field("features").type == pa.list_(pa.list_(pa.float32(), 12))
    assert table.schema.field("boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    for row, record in enumerate(records):
        np.testing.assert_array_equal(np.stack(table["features"][row].as_py()), record.features)
        np.testing.assert_array_equal(np.stack(table["boxes"][row].as_py()), record.boxes)
    assert json.loads(table.schema.metadata[b"scan_pipe"])["store_format"] == STORE_FORMAT


def write_first_format_store(root: Path, records: list[RegionRecord], dim: int, rows_per_part: int) -> None:
    """Parts as the first layout wrote them: features and boxes as flat lists, store_format 1."""
    root.mkdir(parents=True)
    metadata = {"feature_dim": dim, "feature_dtype": "float16", "store_format": 1, "untrained": True}
    for index, start in enumerate(range(0, len(records), rows_per_part)):
        chunk = records[start : start + rows_per_part]
        columns = {
            "image_id": pa.array([r.image_id for r in chunk], pa.string()),
            "image_w": pa.array([r.image_w for r in chunk], pa.int32()),
            "image_h": pa.array([r.image_h for r in chunk], pa.int32()),
            "num_boxes": pa.array([r.num_boxes for r in chunk], pa.int32()),
            "boxes": pa.array([r.boxes.reshape(-1) for r in chunk], pa.list_(pa.float32())),
            "features": pa.array(
                [r.features.astype(np.float16).reshape(-1) for r in chunk], pa.list_(pa.float16())
            ),
        }
        for name, arrow_type in (
            ("object_ids", pa.int32()),
            ("object_conf", pa.float32()),
            ("attribute_ids", pa.int32()),
            ("attribute_conf", pa.float32()),
        ):
            columns[name] = pa.array([getattr(r, name) for r in chunk], pa.list_(arrow_type))
        table = pa.table(columns).replace_schema_metadata({b"scan_pipe": json.dumps(metadata)})
        pq.write_table(table, root / f"part-0-{index:05d}.parquet", row_group_size=2)


def test_first_format_store_is_refused_and_migrates(tmp_path: Path) -> None:
    records = make_records(7, dim=8)
    old = tmp_path / "old"
    write_first_format_store(old, records, dim=8, rows_per_part=3)
    (old / "errors.jsonl").write_text('{"image_id": "x.jpg"}\n')
    (old / "summary.json").write_text("{}\n")
    (old / "captions.parquet").write_bytes(b"")
    with pytest.raises(StoreFormatError, match=r"scan-pipe features migrate .*old NEW_DIR"):
        FeatureStore(old)
    # not "damaged": a resuming writer must stop here, not move every part of an old store to quarantine
    with pytest.raises(StoreFormatError):
        store_repair.part_problem(old / "part-0-00000.parquet")

    result = migrate_store(old, tmp_path / "new")
    assert (result.images, result.parts, result.left_behind) == (7, 3, ["captions.parquet"])
    new = tmp_path / "new"
    assert sorted(p.name for p in new.iterdir()) == [
        "_errors.jsonl",
        "_summary.json",
        "part-0-00000.parquet",
        "part-0-00001.parquet",
        "part-0-00002.parquet",
    ]
    store = FeatureStore(new)
    assert store.metadata["store_format"] == STORE_FORMAT and store.metadata["untrained"] is True
    assert pq.ParquetFile(new / "part-0-00000.parquet").metadata.num_row_groups == 2
    for expected, actual in zip(records, store.iter_records(), strict=True):
        assert actual.image_id == expected.image_id
        np.testing.assert_array_equal(actual.features, expected.features.astype(np.float16))
        np.testing.assert_array_equal(actual.boxes, expected.boxes)
        for name in ("object_ids", "object_conf", "attribute_ids", "attribute_conf"):
            if getattr(expected, name) is None:
                assert getattr(actual, name) is None
            else:
                np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name))

    with pytest.raises(FeatureStoreError, match="not empty"):
        migrate_store(old, new)
    with pytest.raises(FeatureStoreError, match="already in the current layout"):
        migrate_store(new, tmp_path / "again")

    from typer.testing import CliRunner

    from stages.cli import app

    refused = CliRunner().invoke(app, ["features", "info", str(old)])
    assert refused.exit_code != 0 and "features migrate" in refused.output
    migrated = CliRunner().invoke(app, ["features", "migrate", str(old), str(tmp_path / "cli")])
    assert migrated.exit_code == 0, migrated.output
    assert "7 images" in migrated.output and "captions.parquet" in migrated.output
    assert len(FeatureStore(tmp_path / "cli")) == 7


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="descriptors are counted in /proc (Linux)")
def test_reading_keeps_no_part_open(tmp_path: Path) -> None:
    records = make_records(60, dim=4)
    write_store(tmp_path / "store", records, rows_per_part=1)
    gc.collect()  # files of earlier tests' garbage must not close while this one counts
    before = _open_descriptors()
    store = FeatureStore(tmp_path / "store")
    assert len(store.parts) == 60 and _open_descriptors() == before
    streamed = store.iter_records()
    next(streamed)
    assert _open_descriptors() <= before + 1  # the part being streamed, and only that one
    assert len(list(streamed)) == 59 and _open_descriptors() == before
    assert [r.image_id for r in store.read([records[42].image_id, records[3].image_id])] == [
        records[42].image_id,
        records[3].image_id,
    ]
    assert _open_descriptors() == before


def write_many_parts(root: Path, count: int) -> None:
    """`count` one-row parts, copies of one written part with their own ids (fast enough for a test)."""
    write_store(root, make_records(1, dim=4), rows_per_part=1)
    template = pq.read_table(root / "part-0-00000.parquet")
    for index in range(count):
        part = template.set_column(0, template.schema.field(0), pa.array([f"img_{index:05d}"]))
        pq.write_table(part, root / store_module.part_name("0", index))


@pytest.mark.slow
def test_thousands_of_parts_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    """2,000 parts open, stream, read by id and convert under `ulimit -n 256` (a subprocess sets it)."""
    write_many_parts(tmp_path / "store", 2000)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pipeline.store import FeatureStore
store = FeatureStore({str(tmp_path / "store")!r})
assert len(store) == 2000, len(store)
assert sum(1 for _ in store.iter_records(batch_rows=64)) == 2000
assert [r.image_id for r in store.read(["img_01999", "img_00000"])] == ["img_01999", "img_00000"]
table = store.to_mmap({str(tmp_path / "cache")!r})
assert table.index_of("img_01234") == 1234 and table.features(1234).shape == (table.num_boxes(1234), 4)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_table_index_finds_every_id(tmp_path: Path) -> None:
    """Binary search and hash lookups over the mapped ids agree, non-ASCII ids included."""
    records = make_records(150, dim=4)
    for i, record in enumerate(records):
        record.image_id = ["déjà/", "Z/", "a/", "ß/", "日本/"][i % 5] + f"{(i * 37) % 150:03d}.jpg"
    write_store(tmp_path / "store", records, rows_per_part=16)
    table = FeatureStore(tmp_path / "store").to_mmap(tmp_path / "cache")
    ids = [r.image_id for r in records]
    assert [table.index_of(image_id) for image_id in ids] == list(range(150))
    assert [table.image_id(row) for row in range(150)] == ids
    asked = [*ids[::-1], "missing.jpg", ids[7]]
    expected = [*range(149, -1, -1), -1, 7]
    assert table.indices_of(asked).tolist() == expected  # many ids: one hash pass
    assert table.indices_of(asked[-3:]).tolist() == expected[-3:]  # few ids: binary searches
    store = FeatureStore(tmp_path / "store")
    assert store.indices_of(asked).tolist() == expected
    assert ids[9] in store and "missing.jpg" not in store
    clone = pickle.loads(pickle.dumps(table))  # a DataLoader worker: reopens the map, builds nothing
    assert clone.index_of(ids[99]) == 99 and not clone._batches


def test_cached_table_opens_no_part_and_keeps_the_duplicate_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    write_store(root, make_records(3, seed=1), shard="a")
    write_store(root, make_records(2, seed=2), shard="b")  # repeats the first two ids
    cache = tmp_path / "cache"
    with pytest.raises(FeatureStoreError, match="img_000"):
        cached_feature_table(root, cache)
    built = cached_feature_table(root, cache, duplicates="keep_first")
    assert len(built) == 3 and built.duplicates_dropped == 2

    def no_part(path: Path) -> None:
        raise AssertionError(f"{path} opened although the cache is current")

    monkeypatch.setattr(store_module, "open_part", no_part)
    again = cached_feature_table(root, cache, duplicates="keep_first")
    assert again.path == built.path and len(again) == 3
    monkeypatch.undo()
    with pytest.raises(FeatureStoreError, match="img_000"):  # the cache does not hide duplicates
        cached_feature_table(root, cache)


def test_tsv_round_trip(tmp_path: Path) -> None:
    records = make_records(7, dim=12)
    write_store(tmp_path / "store", records, feature_dtype="float32", rows_per_part=3)
    tsv_path = tmp_path / "features.tsv"
    assert export_tsv(tmp_path / "store", tsv_path, progress=False) == 7
    lines = tsv_path.read_text().splitlines()
    assert len(lines) == 7  # no header
    fields = lines[0].split("\t")
    assert len(fields) == 6 and fields[0] == records[0].image_id and int(fields[3]) == records[0].num_boxes
    decoded = np.frombuffer(base64.b64decode(fields[5]), dtype="<f4").reshape(-1, 12)
    np.testing.assert_array_equal(decoded, records[0].features)
    assert import_tsv(tsv_path, tmp_path / "back", feature_dtype="float32", progress=False) == 7
    back = list(FeatureStore(tmp_path / "back").iter_records())
    for expected, actual in zip(records, back, strict=True):
        assert actual.image_id == expected.image_id
        assert (actual.image_w, actual.image_h) == (expected.image_w, expected.image_h)
        np.testing.assert_array_equal(actual.boxes, expected.boxes)
        np.testing.assert_array_equal(actual.features, expected.features)


def test_tsv_errors_name_file_and_line(tmp_path: Path) -> None:
    good = base64.b64encode(np.zeros((2, 4), "<f4").tobytes()).decode()
    feats = base64.b64encode(np.zeros((2, 3), "<f4").tobytes()).decode()
    path = tmp_path / "bad.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["a", 10, 10, 2, good, feats])
        writer.writerow(["b", 10, 10, 3, good, feats])
    with pytest.raises(TsvError, match=r"bad\.tsv:2: boxes"):
        list(read_tsv(path))
    path.write_text("a\t1\t2\n")
    with pytest.raises(TsvError, match=r"bad\.tsv:1: expected 6"):
        list(read_tsv(path))
    path.write_text(f"a\t1\t2\t2\t{good}\t@@not-base64@@\n")
    with pytest.raises(TsvError, match="base64"):
        list(read_tsv(path))
    # a failed import leaves no parts behind
    with pytest.raises(TsvError):
        import_tsv(path, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.parquet"))
    with pytest.raises(TsvError, match="not found"):
        list(read_tsv(tmp_path / "absent.tsv"))


def test_captions_round_trip_and_validation(tmp_path: Path) -> None:
    ids = [i for i in ("a", "b", "c") for _ in range(5)]
    captions = [f"caption {k}" for k in range(15)]
    path = write_captions(tmp_path / "captions.parquet", ids, captions)
    assert [p.name for p in tmp_path.iterdir()] == ["captions.parquet"]  # no temporary file left
    table = read_captions(path, captions_per_image=5)
    assert table.image_ids == ids and table.captions == captions
    assert table.captions_per_image == 5 and table.num_images == 3 and len(table) == 15
    assert table.unique_image_ids == ["a", "b", "c"]
    assert table.captions_of(1) == captions[5:10]
    with pytest.raises(CaptionsError, match="expected 4"):
        read_captions(path, captions_per_image=4)
    with pytest.raises(CaptionsError, match="not consecutive"):
        write_captions(tmp_path / "x.parquet", ["a", "a", "b", "b", "a", "a"], ["c"] * 6)
    with pytest.raises(CaptionsError, match="same number"):
        write_captions(tmp_path / "x.parquet", ["a", "a", "b"], ["c"] * 3)
    with pytest.raises(CaptionsError, match="2 image ids but 3"):
        write_captions(tmp_path / "x.parquet", ["a", "a"], ["c"] * 3)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b", "a"], "caption": ["x", "y", "z"]}), bad)
    with pytest.raises(CaptionsError, match=r"bad\.parquet.*not consecutive"):
        read_captions(bad)
    pq.write_table(pa.table({"image": ["a"], "caption": ["x"]}), bad)
    with pytest.raises(CaptionsError, match=r"bad\.parquet: missing column 'image_id'"):
        read_captions(bad)
    with pytest.raises(CaptionsError, match="not found"):
        read_captions(tmp_path / "absent.parquet")
