"""Search at scale: index build time, size on disk, peak memory and per-query latency at 10k, 100k, 1M images.

Why synthetic embeddings: the index stores the encoders' outputs, and 1M images of 36 x 2048 raw features
(147 GB) cannot be extracted or encoded here. So the region embeddings themselves are generated (numpy,
seed 0) and written with the library's own shard writer (`pipeline.index.shards.write_shard`), and the rest
of the build is the library's (`index.build.build_token_side`): k-means on a sample, exact assignment of
every region, residual PQ codebooks and codes (`index.residuals`), then the inverted lists
(`tokens.build_image_lists`). Queries run the library's shortlist as `scan-pipe search` does
(`ImageTokenLists.shortlist`: probe nprobe 8 centroids per word, then SCAN's score on centroid +
residual-code products, `search.centroid_scorer`, for the default max(16 k, 2048) candidates) and the
exact SCAN re-rank of k = 128 (`ShardSet.gather` of the float16 rows from the memory map +
`evaluation.score_encoded`), with a `scan_t2i_avg` model (its weights do not matter to the score, only
its options: clipped_l2norm, lambda 9, Mean). One torch thread (faster than two for these small tensors on
this shared 2-core machine).

The embeddings: `--concepts` (8,192) concept and 512 clutter unit vectors in R^d; an image has 3-5 object
concepts with 1-3 regions each and clutter regions up to 36; a region is its vector + N(0, 0.35^2 / d) per
dimension, L2-normalised (cosine about 0.94 to its vector), as an encoder's regions cluster around object
classes. A query is 12 word vectors: 3 concepts of one gallery image ("the source"), noisy the same way,
and 9 filler words (random unit vectors shared by all queries). "source in shortlist" counts how often that
image made the k = 128 shortlist.

Storage plan for 1M x 36 regions: at SCAN's d = 1024 the float16 rows alone are 73.7 GB, beyond this
machine, so the full-scale run uses d = `--dim` (128; 9.2 GB) for everything, and the d-dependent parts are
measured again at d = 1024 in a separate step (`--project-dim`): words x centroids (12 x nlist x d) and the
exact re-rank of 128 images read from a float16 memory map of 4,096 images x 36 x 1,024 generated the same
way (k random images of it per query). Their difference projects the 1M latency to d = 1024; the other
parts (inverted lists, the centroid/residual-code interaction) do not depend on d (the residual lookups grow
with the code length: 16 bytes at d = 128, 32 at d = 1024). Build time scales with d for k-means,
assignment and residual encoding (rows x nlist x d), and the shards' size with d exactly.

Each gallery size is generated, built and queried in its own subprocesses; peak RSS is `ru_maxrss` of the
build and of the query process, which counts the touched pages of the memory-mapped shards and codes (page
cache, reclaimable); the query process's anonymous memory (RssAnon) after the queries is reported too.

    python3 benchmarks/search_scale.py [--sizes 10000 100000 1000000] [--dim 128] [--nlist-1m N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
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

import numpy as np  # noqa: E402

REGIONS = 36
CLUTTER = 512
NOISE = 0.35
QUERY_WORDS = 12
QUERY_CONCEPTS = 3
SHARD_SIZE = 4096
K = 128


def peak_rss_mib() -> float:
    """Peak resident set (ru_maxrss): counts the touched pages of memory-mapped files too."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_anon_mib() -> float:
    """Anonymous resident memory now (the process's own allocations, no file pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _vectors(seed: int, count: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _noisy(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    rows = base + rng.standard_normal(base.shape, dtype=np.float32) * np.float32(
        NOISE / math.sqrt(base.shape[1])
    )
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def image_objects(rng: np.random.Generator, count: int, concepts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: concept ids of its 36 regions (-1 - clutter id for clutter) and 3 named object concepts."""
    labels = np.empty((count, REGIONS), dtype=np.int64)
    named = np.empty((count, QUERY_CONCEPTS), dtype=np.int64)
    for i in range(count):
        objects = rng.choice(concepts, size=int(rng.integers(3, 6)), replace=False)
        per = rng.integers(1, 4, size=len(objects))
        row = np.repeat(objects, per)
        row = np.concatenate([row, -1 - rng.integers(0, CLUTTER, REGIONS - len(row))])
        labels[i] = rng.permutation(row)
        named[i] = objects[:QUERY_CONCEPTS]
    return labels, named


def generate_shard(shard: int, count: int, dim: int, concepts: np.ndarray, clutter: np.ndarray):
    rng = np.random.default_rng((0, shard))
    labels, named = image_objects(rng, count, len(concepts))
    flat = labels.reshape(-1)
    base = np.where(flat[:, None] >= 0, concepts[np.maximum(flat, 0)], clutter[np.maximum(-1 - flat, 0)])
    return _noisy(rng, base).astype(np.float16), named


# ------------------------------------------------------------------------------------------- the steps


def step_build(workdir: Path, size: int, dim: int, concepts_n: int, nlist: int | None) -> dict[str, Any]:
    from pipeline.index.build import build_token_side
    from pipeline.index.shards import ShardSet, shard_count, write_shard
    from pipeline.index.tokens import build_image_lists

    concepts, clutter = _vectors(1, concepts_n, dim), _vectors(2, CLUTTER, dim)
    images, tokens = workdir / "images", workdir / "tokens"
    times: dict[str, float] = {}
    started = time.perf_counter()
    named_all = []
    for shard in range(shard_count(size, SHARD_SIZE)):
        count = min(SHARD_SIZE, size - shard * SHARD_SIZE)
        rows, named = generate_shard(shard, count, dim, concepts, clutter)
        ids = [f"images/{shard * SHARD_SIZE + i:08d}.jpg" for i in range(count)]
        write_shard(images, shard, rows, np.full(count, REGIONS, np.int32), {"ids": ids})
        named_all.append(named)
    np.save(workdir / "named.npy", np.concatenate(named_all))
    times["generate_and_write_shards_s"] = time.perf_counter() - started
    shards = ShardSet(images, size, SHARD_SIZE)
    side = build_token_side(shards, tokens, "images", nlist=nlist)
    times.update(side.seconds)
    started = time.perf_counter()
    build_image_lists(tokens, side.codes, shards.lengths, side.nlist, side.residuals)
    times["lists_s"] = time.perf_counter() - started
    sizes = {
        "shards_bytes": sum(p.stat().st_size for p in images.rglob("*") if p.is_file()),
        # centroids, codebooks, padded centroid and residual codes, lists (the per-shard code files are
        # the resumable copy of the codes and not counted)
        "index_bytes": sum(p.stat().st_size for p in tokens.glob("images_*.npy") if p.is_file()),
    }
    return {
        "size": size,
        "nlist": side.nlist,
        "residual_bytes_per_region": int(side.residuals.shape[1]),
        "regions": int(shards.lengths.sum()),
        **times,
        **sizes,
        "build_peak_rss_mib": peak_rss_mib(),
    }


def _queries(
    workdir: Path, count: int, dim: int, concepts_n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    concepts = _vectors(1, concepts_n, dim)
    fillers = _vectors(3, 64, dim)
    named = np.load(workdir / "named.npy")
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(named), size=count, replace=False)
    words = np.empty((count, QUERY_WORDS, dim), dtype=np.float32)
    for q, source in enumerate(sources):
        base = np.concatenate(
            [concepts[named[source]], fillers[rng.choice(64, QUERY_WORDS - QUERY_CONCEPTS)]]
        )
        words[q] = _noisy(rng, base)[rng.permutation(QUERY_WORDS)]
    return words, sources


def step_query(workdir: Path, size: int, dim: int, concepts_n: int, queries: int) -> dict[str, Any]:
    import torch

    from pipeline.evaluation import EncodedCaptions, score_encoded
    from pipeline.index.shards import ShardSet
    from pipeline.index.tokens import ImageTokenLists
    from pipeline.models.build import create_model
    from pipeline.search import SearchOptions, centroid_scorer

    torch.set_num_threads(1)
    opened = time.perf_counter()
    lists = ImageTokenLists(workdir / "tokens")
    shards = ShardSet(workdir / "images", size, SHARD_SIZE)
    open_s = time.perf_counter() - opened
    model = create_model("scan_t2i_avg", vocab_size=10, img_dim=8, embed_size=dim, word_dim=8).eval()
    words, sources = _queries(workdir, queries + 3, dim, concepts_n, seed=7)
    shortlist_ms, rerank_ms, found = [], [], 0
    for q in range(len(words)):
        t0 = time.perf_counter()
        rescore = centroid_scorer(model.config, torch.from_numpy(words[q]), query_side="captions")
        positions, _ = lists.shortlist(
            words[q], K, nprobe=8, candidates=SearchOptions().pool(K), rescore=rescore
        )
        t1 = time.perf_counter()
        rows, _ = shards.gather(positions)
        caption = EncodedCaptions(
            [torch.zeros(1, dtype=torch.long)],
            [torch.from_numpy(words[q])[None]],
            [torch.tensor([QUERY_WORDS])],
            1,
        )
        scores = score_encoded(model, torch.from_numpy(rows), None, caption)[:, 0].numpy()
        _top = positions[np.argsort(-scores, kind="stable")[:10]]
        t2 = time.perf_counter()
        if q >= 3:  # the first three warm up the maps and the allocator
            shortlist_ms.append(1000 * (t1 - t0))
            rerank_ms.append(1000 * (t2 - t1))
            found += int(sources[q] in positions)
    scores_ms = []
    for q in range(3, len(words)):  # the d-dependent part of the shortlist alone: words x centroids
        t0 = time.perf_counter()
        _ = words[q] @ lists.centroids.T
        scores_ms.append(1000 * (time.perf_counter() - t0))
    total = np.array(shortlist_ms) + np.array(rerank_ms)
    return {
        "size": size,
        "open_s": open_s,
        "shortlist_ms_median": float(np.median(shortlist_ms)),
        "shortlist_ms_p90": float(np.percentile(shortlist_ms, 90)),
        "rerank_ms_median": float(np.median(rerank_ms)),
        "rerank_ms_p90": float(np.percentile(rerank_ms, 90)),
        "total_ms_median": float(np.median(total)),
        "total_ms_p90": float(np.percentile(total, 90)),
        "word_centroid_ms_median": float(np.median(scores_ms)),
        "source_in_shortlist": found / queries,
        "query_peak_rss_mib": peak_rss_mib(),
        "query_rss_anon_mib": rss_anon_mib(),
    }


def step_project(workdir: Path, dim: int, nlist: int, concepts_n: int, queries: int) -> dict[str, Any]:
    """The d-dependent parts at SCAN's d: words x centroids, and the exact re-rank of k mapped images."""
    import torch

    from pipeline.evaluation import EncodedCaptions, score_encoded
    from pipeline.models.build import create_model

    torch.set_num_threads(1)
    pool = 4096
    path = workdir / f"rerank-{dim}.npy"
    concepts, clutter = _vectors(1, concepts_n, dim), _vectors(2, CLUTTER, dim)
    rows, _ = generate_shard(0, pool, dim, concepts, clutter)
    np.save(path, rows.reshape(pool, REGIONS, dim))
    del rows
    mapped = np.load(path, mmap_mode="r")
    centroids = _vectors(5, nlist, dim)
    model = create_model("scan_t2i_avg", vocab_size=10, img_dim=8, embed_size=dim, word_dim=8).eval()
    from pipeline.index.residuals import CODEBOOK_SIZE, corrections, default_subspaces, lookup_table

    subspaces = default_subspaces(dim)
    books = _vectors(6, subspaces * CODEBOOK_SIZE, dim // subspaces).reshape(subspaces, CODEBOOK_SIZE, -1)
    rng = np.random.default_rng(11)
    residual_codes = rng.integers(0, CODEBOOK_SIZE, (max(16 * K, 2048), REGIONS, subspaces), dtype=np.uint8)
    word_ms, rerank_ms, residual_ms = [], [], []
    for q in range(queries + 3):
        words = _vectors(100 + q, QUERY_WORDS, dim)
        t0 = time.perf_counter()
        _ = words @ centroids.T
        t1 = time.perf_counter()
        corrections(lookup_table(words, books), residual_codes, CODEBOOK_SIZE)
        residual_ms.append(1000 * (time.perf_counter() - t1))
        t1 = time.perf_counter()
        chosen = np.sort(rng.choice(pool, size=K, replace=False))
        gathered = np.asarray(mapped[chosen], dtype=np.float32)
        caption = EncodedCaptions(
            [torch.zeros(1, dtype=torch.long)],
            [torch.from_numpy(words)[None]],
            [torch.tensor([QUERY_WORDS])],
            1,
        )
        score_encoded(model, torch.from_numpy(gathered), None, caption)
        t2 = time.perf_counter()
        if q >= 3:
            word_ms.append(1000 * (t1 - t0))
            rerank_ms.append(1000 * (t2 - t1))
    path.unlink()
    return {
        "dim": dim,
        "nlist": nlist,
        "word_centroid_ms_median": float(np.median(word_ms)),
        "residual_ms_median": float(np.median(residual_ms[3:])),
        "residual_bytes": subspaces,
        "rerank_ms_median": float(np.median(rerank_ms)),
        "rerank_ms_p90": float(np.percentile(rerank_ms, 90)),
    }


# ---------------------------------------------------------------------------------------------- driver


def run_step(args: argparse.Namespace, step: str, **extra: Any) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--step", step, "--workdir", str(args.workdir), "--dim", str(args.dim),
        "--concepts", str(args.concepts), "--queries", str(args.queries),
    ]  # fmt: skip
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_power_law(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """(b, a) of value = a * size^b, least squares in log-log."""
    b, log_a = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(b), float(math.exp(log_a))


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    mib = 1024 * 1024
    head = "| measure | " + " | ".join(f"{r['size']:,} images" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]

    def add(label: str, fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |")

    add("regions / centroids (nlist)", lambda r: f"{r['regions']:,} / {r['nlist']:,}")
    add("build: generate + write shards", lambda r: f"{r['generate_and_write_shards_s']:.1f} s")
    add("build: k-means (sample)", lambda r: f"{r['kmeans_s']:.1f} s")
    add("build: assign every region", lambda r: f"{r['assign_s']:.1f} s")
    add(
        "build: residual codebooks + codes",
        lambda r: f"{r['residual_train_s']:.1f} + {r['residual_encode_s']:.1f} s",
    )
    add("build: inverted lists", lambda r: f"{r['lists_s']:.1f} s")
    add("float16 shards on disk", lambda r: f"{r['shards_bytes'] / mib:,.0f} MiB")
    add("index (centroids, codes, residual codes, lists)", lambda r: f"{r['index_bytes'] / mib:,.1f} MiB")
    add(
        "peak RSS build / query (incl. mapped files)",
        lambda r: f"{r['build_peak_rss_mib']:,.0f} / {r['query_peak_rss_mib']:,.0f} MiB",
    )
    add("query process anonymous memory", lambda r: f"{r['query_rss_anon_mib']:,.0f} MiB")
    add("open index (s)", lambda r: f"{r['open_s']:.2f} s")
    add(
        "shortlist ms (median / p90)",
        lambda r: f"{r['shortlist_ms_median']:.1f} / {r['shortlist_ms_p90']:.1f}",
    )
    add(
        "re-rank k=128 ms (median / p90)", lambda r: f"{r['rerank_ms_median']:.1f} / {r['rerank_ms_p90']:.1f}"
    )
    add("total ms (median / p90)", lambda r: f"{r['total_ms_median']:.1f} / {r['total_ms_p90']:.1f}")
    add("source image in shortlist", lambda r: f"{100 * r['source_in_shortlist']:.0f} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--project-dim", type=int, default=1024)
    parser.add_argument("--concepts", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument(
        "--nlist-1m", type=int, default=0, help="centroids at >= 1M images (0: the default rule, 4,096 there)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nlist", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step is not None:
        folder = args.workdir / str(args.size) if args.size else args.workdir
        if args.step == "build":
            result = step_build(folder, args.size, args.dim, args.concepts, args.nlist or None)
        elif args.step == "query":
            result = step_query(folder, args.size, args.dim, args.concepts, args.queries)
        else:
            result = step_project(folder, args.dim, args.nlist, args.concepts, args.queries)
        print(json.dumps(result))
        return
    own = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-scale-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            nlist = args.nlist_1m if size >= 1_000_000 and args.nlist_1m else 0
            started = time.perf_counter()
            build = run_step(args, "build", size=size, nlist=nlist)
            query = run_step(args, "query", size=size)
            rows.append({**build, **query, "wall_s": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(args.workdir / str(size), ignore_errors=True)
        largest = rows[-1]
        projected_args = argparse.Namespace(**{**vars(args), "dim": args.project_dim})
        projection = run_step(projected_args, "project", nlist=largest["nlist"])
        at_dim = run_step(args, "project", nlist=largest["nlist"])
        largest_projected = (
            largest["total_ms_median"]
            - at_dim["word_centroid_ms_median"] - at_dim["rerank_ms_median"] - at_dim["residual_ms_median"]
            + projection["word_centroid_ms_median"] + projection["rerank_ms_median"]
            + projection["residual_ms_median"]
        )  # fmt: skip
        sizes = [r["size"] for r in rows]
        report = {
            "rows": rows,
            "projection": {
                "measured_dim": at_dim,
                "project_dim": projection,
                "total_ms_median": largest_projected,
            },
            "fits": {
                key: fit_power_law(sizes, [r[key] for r in rows])
                for key in ("shortlist_ms_median", "rerank_ms_median", "total_ms_median")
            }
            if len(rows) > 1
            else {},
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
            "command": " ".join(["python3", *sys.argv]),
        }
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
        print(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
