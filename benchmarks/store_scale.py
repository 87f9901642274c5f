"""Feature store at scale: open time, resident memory and random reads for 100k and 1M images, old vs new.

"Old" is the reading code before the self-describing layout (git ref `--old-ref`: every part kept open, ids
as a Python list plus a dict per process, the mmap table rebuilding both in each DataLoader worker); "new"
is the working tree (parts opened one at a time, ids as one Arrow array; the mmap table's ids and their
sorted order memory-mapped from an index file). Both read the same rows, each in its own layout.

Rows: synthetic, made with numpy (seed 0) and written part by part with pyarrow, exactly as the writer lays
them out (parts of `--rows-per-part` rows, row groups of 256, lz4, dictionary-encoded ids): `--regions`
regions of `--dim` float16 features each (small, so 1M images take ~100 MB per layout), random boxes,
ids `images/<8 digits>.jpg` in shuffled order, no class ids.

Every measurement runs in a fresh subprocess, so one's allocations cannot hide another's:
- build: `FeatureStore(root)` (s, RssAnon kept, descriptors held), random `store.read([id])` straight from
  Parquet (the no-second-copy alternative), then `to_mmap` (the one-time conversion);
- start: what training start does with a current cache (old: `FeatureStore(root).to_mmap`, new:
  `cached_feature_table`), s and RssAnon;
- worker: what a DataLoader worker does (`RegionFeatureTable(path)`), s and RssAnon; then `--reads` random
  `features(idx)` (one value touched each), `index_of` of as many random ids, and one `indices_of` of them
  (old: the per-id loop `map_image_ids` ran).
A 10M-image column projects the two sizes linearly.

    python3 benchmarks/store_scale.py [--sizes 100000 1000000] [--workdir DIR] [--keep] [--json F]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OLD_REF = "dca3ea8"  # the last commit with flat-list features and the dict-of-ids readers
ROW_GROUP = 256
PROJECT_TO = 10_000_000


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (page cache of mapped files not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------------------------------ generation


def generate(root: Path, size: int, *, regions: int, dim: int, rows_per_part: int, old: bool) -> None:
    """`size` synthetic images in parts, in the old (flat lists) or the new (fixed-size lists) layout."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import STORE_FORMAT, store_schema

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(size)
    metadata = {"feature_dim": dim, "feature_dtype": "float16", "store_format": 1 if old else STORE_FORMAT}
    if old:
        schema = pa.schema(
            [
                pa.field("image_id", pa.string(), nullable=False),
                pa.field("image_w", pa.int32(), nullable=False),
                pa.field("image_h", pa.int32(), nullable=False),
                pa.field("num_boxes", pa.int32(), nullable=False),
                pa.field("boxes", pa.list_(pa.float32()), nullable=False),
                pa.field("features", pa.list_(pa.float16()), nullable=False),
                pa.field("object_ids", pa.list_(pa.int32())),
                pa.field("object_conf", pa.list_(pa.float32())),
                pa.field("attribute_ids", pa.list_(pa.int32())),
                pa.field("attribute_conf", pa.list_(pa.float32())),
            ]
        )
    else:
        schema = store_schema("float16", dim)
    schema = schema.with_metadata({b"scan_pipe": json.dumps(metadata, sort_keys=True).encode()})
    for index, start in enumerate(range(0, size, rows_per_part)):
        rows = min(rows_per_part, size - start)
        counts = np.full(rows, regions, dtype=np.int32)
        region_offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * regions)
        features = pa.array(rng.standard_normal(rows * regions * dim).astype(np.float16))
        boxes = pa.array(rng.uniform(0, 500, rows * regions * 4).astype(np.float32))
        if old:
            feature_column = pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * regions * dim), features
            )
            box_column = pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * regions * 4), boxes
            )
        else:
            feature_column = pa.ListArray.from_arrays(
                region_offsets, pa.FixedSizeListArray.from_arrays(features, dim)
            )
            box_column = pa.ListArray.from_arrays(region_offsets, pa.FixedSizeListArray.from_arrays(boxes, 4))
        columns = [
            pa.array([f"images/{i:08d}.jpg" for i in order[start : start + rows]], pa.string()),
            pa.array(rng.integers(200, 900, rows).astype(np.int32)),
            pa.array(rng.integers(200, 900, rows).astype(np.int32)),
            pa.array(counts),
            box_column,
            feature_column,
        ]
        columns += [pa.nulls(rows, type=schema.field(name).type) for name in schema.names[6:]]
        pq.write_table(
            pa.Table.from_arrays(columns, schema=schema),
            root / f"part-0-{index:05d}.parquet",
            row_group_size=ROW_GROUP,
            use_dictionary=["image_id"],
            write_statistics=["image_id", "image_w", "image_h", "num_boxes"],
            compression="lz4",
        )


def old_modules(workdir: Path, ref: str) -> Path | None:
    """The old store and feature_table modules from git, importable as `old_store`, `old_feature_table`."""
    folder = workdir / "old_code"
    folder.mkdir(exist_ok=True)
    try:
        store = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{ref}:pipeline/store.py"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        table = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{ref}:pipeline/feature_table.py"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"old code not measured: git show {ref} failed ({exc})")
        return None
    store = store.replace("from pipeline.feature_table import", "from old_feature_table import")
    (folder / "old_store.py").write_text(store)
    (folder / "old_feature_table.py").write_text(
        table.replace("from pipeline.store import", "from old_store import")
    )
    return folder


# ------------------------------------------------------------------------------------------ children


def _warm_up() -> None:
    """First use of Arrow's allocator, IPC and compute kernels, so that it is not billed to the first step."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(["b", "a", "c"], pa.large_string())
    pc.index_in(ids, value_set=pc.unique(ids))
    pc.array_sort_indices(ids)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, pa.schema([("id", pa.large_string())])) as writer:
        writer.write_batch(pa.record_batch([ids], names=["id"]))
    pa.ipc.open_file(pa.BufferReader(sink.getvalue())).get_batch(0)


def _measure(action: Any) -> tuple[Any, float, int]:
    """(result, seconds, RssAnon it kept) of calling `action`."""
    gc.collect()
    before = rss_anon()
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    gc.collect()
    return result, seconds, rss_anon() - before


def child(args: argparse.Namespace) -> None:
    import numpy as np

    if args.impl == "old":
        import resource

        # The old reader keeps every part open: let it, to measure it (a 1,024 limit stops it at 1M images).
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        sys.path.insert(0, args.old_code)
        import old_feature_table as feature_table  # type: ignore[import-not-found]
        import old_store as store_module  # type: ignore[import-not-found]

        def start() -> Any:
            return store_module.FeatureStore(args.root).to_mmap(args.cache)
    else:
        from pipeline import feature_table
        from pipeline import store as store_module

        def start() -> Any:
            return feature_table.cached_feature_table(args.root, args.cache)

    _warm_up()
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    if args.step == "build":
        descriptors = open_descriptors()
        store, out["open_s"], out["open_rss"] = _measure(lambda: store_module.FeatureStore(args.root))
        out["open_fds"] = open_descriptors() - descriptors
        all_ids = store.image_ids
        ids = [all_ids[i] for i in rng.integers(0, len(store), args.parquet_reads)]
        started = time.perf_counter()
        store.read(ids)  # one call: one id lookup, then a row group decoded per image
        out["parquet_read_ms"] = (time.perf_counter() - started) / len(ids) * 1e3
        _, out["build_s"], _ = _measure(lambda: store.to_mmap(args.cache))
    elif args.step == "start":
        _, out["start_s"], out["start_rss"] = _measure(start)
    elif args.step == "wide":
        store = store_module.FeatureStore(args.root)
        all_ids = store.image_ids
        ids = [all_ids[i] for i in rng.choice(len(store), min(64, len(store)), replace=False)]
        started = time.perf_counter()
        checksum = sum(float(record.features.sum(dtype=np.float32)) for record in store.read(ids))
        out["parquet_read_ms"] = (time.perf_counter() - started) / len(ids) * 1e3
        table = store.to_mmap(args.cache)
        rows = rng.integers(0, len(table), args.reads)
        started = time.perf_counter()
        checksum += sum(float(table.features(int(row)).sum(dtype=np.float32)) for row in rows)
        out["features_us"] = (time.perf_counter() - started) / len(rows) * 1e6
        out["checksum"] = checksum
    else:
        path = next(p for p in sorted(Path(args.cache).glob("regions-*.arrow")) if ".index." not in p.name)
        table, out["worker_s"], out["worker_rss"] = _measure(lambda: feature_table.RegionFeatureTable(path))
        rows = rng.integers(0, len(table), args.reads)
        started = time.perf_counter()
        total = 0.0
        for row in rows:
            total += float(table.features(int(row))[0, 0])
        out["features_us"] = (time.perf_counter() - started) / len(rows) * 1e6
        wanted = [
            str(table.image_ids[int(row)]) if args.impl == "old" else table.image_id(int(row)) for row in rows
        ]
        started = time.perf_counter()
        found = [table.index_of(image_id) for image_id in wanted]
        out["index_of_us"] = (time.perf_counter() - started) / len(wanted) * 1e6
        assert found == rows.tolist()
        started = time.perf_counter()
        if args.impl == "old":
            mapped = np.array([table.index_of(image_id) for image_id in wanted])
        else:
            mapped = table.indices_of(wanted)
        out["map_ids_ms"] = (time.perf_counter() - started) * 1e3
        assert mapped.tolist() == rows.tolist()
        out["rss_after_reads"] = rss_anon()
        out["checksum"] = total
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------ driver


def run_child(args: argparse.Namespace, **options: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", value]
    command += ["--reads", str(args.reads), "--parquet-reads", str(args.parquet_reads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def project(small: tuple[int, float], large: tuple[int, float], to: int) -> float:
    """Linear through the two measured sizes, evaluated at `to`."""
    (n0, v0), (n1, v1) = small, large
    return v1 + (v1 - v0) * (to - n1) / (n1 - n0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--regions", type=int, default=2)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--rows-per-part", type=int, default=512)
    parser.add_argument("--reads", type=int, default=10_000, help="random features(idx) / index_of calls")
    parser.add_argument("--parquet-reads", type=int, default=200, help="random images read from Parquet")
    parser.add_argument(
        "--wide-images", type=int, default=1024, help="images of 36 x 2048 for the Parquet-vs-map read check"
    )
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref of the old reading code")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep a temporary workdir")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("impl", "step", "root", "cache", "old-code"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from rich.console import Console
    from rich.table import Table

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scan-pipe-store-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console = Console(width=200)
    results: dict[str, dict[int, dict[str, Any]]] = {"old": {}, "new": {}}
    try:
        old_code = old_modules(workdir, args.old_ref)
        impls = ["old", "new"] if old_code else ["new"]
        for size in args.sizes:
            for impl in impls:
                root = workdir / f"{impl}-{size}" / "features"
                cache = workdir / f"{impl}-{size}" / "cache"
                if not root.is_dir():
                    started = time.perf_counter()
                    generate(
                        root,
                        size,
                        regions=args.regions,
                        dim=args.dim,
                        rows_per_part=args.rows_per_part,
                        old=impl == "old",
                    )
                    console.print(
                        f"{impl} store of {size:,} images written in {time.perf_counter() - started:.1f} s"
                    )
                shutil.rmtree(cache, ignore_errors=True)
                common = {
                    "impl": impl,
                    "root": str(root),
                    "cache": str(cache),
                    "old_code": str(old_code or ""),
                }
                measured: dict[str, Any] = {"parts": len(list(root.glob("part-*.parquet")))}
                for step in ("build", "start", "worker"):
                    measured.update(run_child(args, step=step, **common))
                results[impl][size] = measured
                console.print(f"{impl} {size:,}: {json.dumps(measured)}")
        # Realistic rows (36 x 2048 float16, 147 KB each): what one image costs from Parquet vs the map.
        wide = workdir / "wide" / "features"
        if not wide.is_dir():
            generate(
                wide, args.wide_images, regions=36, dim=2048, rows_per_part=args.rows_per_part, old=False
            )
        shutil.rmtree(workdir / "wide" / "cache", ignore_errors=True)
        wide_result = run_child(
            args, step="wide", impl="new", root=str(wide), cache=str(workdir / "wide" / "cache"), old_code=""
        )
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    # (label, key, unit, projected linearly to 10M: only what grows with the row count)
    rows = [
        ("FeatureStore open", "open_s", "s", True),
        ("  RssAnon kept", "open_rss", "MiB", True),
        ("  descriptors held", "open_fds", "", True),
        ("Parquet read of 1 image by id", "parquet_read_ms", "ms", False),
        ("mmap conversion (once)", "build_s", "s", True),
        ("training start, cache current", "start_s", "s", True),
        ("  RssAnon kept", "start_rss", "MiB", True),
        ("worker reopens the table", "worker_s", "s", True),
        ("  RssAnon kept", "worker_rss", "MiB", True),
        ("features(idx), random", "features_us", "us", False),
        ("index_of(id), random", "index_of_us", "us", False),
        (f"map {args.reads:,} ids to rows", "map_ids_ms", "ms", True),
    ]
    sizes = sorted(args.sizes)
    table = Table(
        title=f"Feature store scale: {args.regions} regions x {args.dim} float16, "
        f"{args.rows_per_part} rows per part"
    )
    table.add_column("measure")
    for size in sizes:
        for impl in ("old", "new"):
            if results[impl]:
                table.add_column(f"{impl} {size:,}", justify="right")
    if len(sizes) >= 2:
        for impl in ("old", "new"):
            if results[impl]:
                table.add_column(f"{impl} {PROJECT_TO:,} (proj.)", justify="right")

    def shown(value: float, unit: str) -> str:
        if unit == "MiB":
            return f"{value / 2**20:,.1f} MiB"
        if unit == "":
            return f"{value:,.0f}"
        return f"{value:,.3g} {unit}"

    for label, key, unit, linear in rows:
        cells = [label]
        for size in sizes:
            for impl in ("old", "new"):
                if results[impl]:
                    cells.append(shown(results[impl][size][key], unit))
        if len(sizes) >= 2:
            for impl in ("old", "new"):
                if results[impl] and linear:
                    small = (sizes[0], results[impl][sizes[0]][key])
                    large = (sizes[-1], results[impl][sizes[-1]][key])
                    cells.append(shown(max(0.0, project(small, large, PROJECT_TO)), unit))
                elif results[impl]:
                    cells.append("-")
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"{args.wide_images:,} images of 36 x 2048 float16, whole (n, D) array summed: "
        f"Parquet row-group read {wide_result['parquet_read_ms']:.1f} ms per image, "
        f"memory-mapped table {wide_result['features_us']:.0f} us per image"
    )
    results["wide"] = wide_result  # type: ignore[assignment]
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
