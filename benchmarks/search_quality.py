"""Search quality: how much of SCAN's exact top-10 the index's shortlist keeps, and R@K two-stage vs exact.

The data ("concept" images, made here with numpy, seed `--seed`):
- `--concepts` concepts, each a random unit vector in R^`--img-dim` named by one word (`c000`, `c001`, ...);
  `--clutter` more unit vectors stand for unnamed background stuff.
- Training and validation (200) images share one feature store; the gallery has its own.
- An image holds 3-5 distinct concepts (object sets unique over all splits, so gallery images are new
  combinations of known concepts). Each concept gets 1-3 regions: 3 x its vector + N(0, `--noise`^2) per
  dimension (0.2: cosine about 0.8 between a region's feature and its concept); the other regions up to
  36 are background: 1.5 x a clutter vector + the same noise (cosine about 0.55). Regions are shuffled;
  boxes are random rectangles in a 640 x 480 image.
- 5 captions per image, each naming 2 to all of its concepts in random order between 0-2 filler words
  ("a", "the", "with", "near", "photo", ...), e.g. "a photo of c017 near the c003 and c071".

The model: `scan_t2i_avg` (embed `--embed-size` 128, word_dim 128, bi-GRU, raw_feature_norm `softmax`)
trained with the project's trainer (`pipeline.train.train`: Adam at `--lr` 1e-3, triplet loss summed over
the negatives, batch 64) for `--epochs` epochs on the training images, validated on 100 images. (The
published `clipped_l2norm` with hardest negatives barely moves in a few hundred steps on this CPU; softmax
with summed violations trains in minutes. The index does not depend on either choice.) Then the gallery
(held-out images, their own feature store) is indexed with `pipeline.index.build.build_index` and
searched with `pipeline.search.Searcher`.

Measured, over `--queries` text queries (the first caption of the first `--queries` gallery images; the
right answer is that image):
- exact: SCAN's score of every query against every gallery image (`model.similarity` on the index's
  float16 embeddings, the scorer the re-rank uses), its top-10 and R@1/5/10;
- for each k: the shortlist of the default first stage (`Searcher.image_shortlist`); "kept" = the share of
  the exact top-10 inside it; the two-stage ranking = the shortlist ordered by exact score (what
  `Searcher.text` returns; checked on a few queries), its R@1/5/10;
- an ablation at k = 128: nprobe, the candidates pool of the second stage (default max(16 k, 2048) = 2048),
  the residual codes (off: centroids alone), and the second stage without the model (centroid MaxSim
  instead of SCAN's score on centroids).

    python3 benchmarks/search_quality.py [--train-images 3000] [--gallery 4000] [--queries 500] [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FILLERS = ("a", "the", "with", "and", "near", "some", "photo", "of", "there", "is", "on", "in", "two", "big")
K_VALUES = (16, 32, 64, 128, 256, 512, 1024)
REGIONS = 36


def _caption(rng: np.random.Generator, objects: list[int]) -> str:
    named = rng.permutation(objects)[: int(rng.integers(2, len(objects) + 1))]
    words: list[str] = []
    for concept in named:
        words.extend(rng.choice(FILLERS, size=int(rng.integers(0, 3))).tolist())
        words.append(f"c{int(concept):03d}")
    return " ".join(words)


def make_concept_data(root: Path, splits: dict[str, int], args: argparse.Namespace) -> dict[str, Path]:
    """One feature store per split plus `<split>/captions.parquet` and a vocabulary (see the docstring)."""
    from pipeline.captions import write_captions
    from pipeline.store import RegionRecord
    from pipeline.store_writer import FeatureStoreWriter
    from pipeline.vocab import build_vocabulary

    rng = np.random.default_rng(args.seed)
    dim = args.img_dim
    concepts = rng.standard_normal((args.concepts, dim))
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    clutter = rng.standard_normal((args.clutter, dim))
    clutter /= np.linalg.norm(clutter, axis=1, keepdims=True)
    seen: set[tuple[int, ...]] = set()
    paths: dict[str, Path] = {}
    all_captions: list[str] = []
    for split, count in splits.items():
        ids: list[str] = []
        captions: list[str] = []
        store = root / ("gallery" if split == "gallery" else "train") / "features"  # train + val share one
        with FeatureStoreWriter(store, shard=split, rows_per_part=1024, row_group_size=256) as writer:
            for index in range(count):
                while True:
                    objects = sorted(
                        rng.choice(args.concepts, size=int(rng.integers(3, 6)), replace=False).tolist()
                    )
                    if tuple(objects) not in seen:
                        seen.add(tuple(objects))
                        break
                rows = []
                for concept in objects:
                    rows.extend(3.0 * concepts[concept] for _ in range(int(rng.integers(1, 4))))
                rows.extend(1.5 * clutter[c] for c in rng.integers(0, args.clutter, REGIONS - len(rows)))
                regions = np.stack(rows) + args.noise * rng.standard_normal((REGIONS, dim))
                regions = regions[rng.permutation(REGIONS)]
                corners = rng.uniform(0, 1, (REGIONS, 4)) * [640, 480, 640, 480]
                boxes = np.concatenate(
                    [np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])],
                    axis=1,
                )
                image_id = f"{split}/{index:06d}.jpg"
                writer.add(
                    RegionRecord(image_id, 640, 480, boxes.astype(np.float32), regions.astype(np.float16))
                )
                ids.append(image_id)
                captions.extend(_caption(rng, objects) for _ in range(5))
        paths[f"{split}_features"] = store
        paths[f"{split}_captions"] = write_captions(
            root / split / "captions.parquet",
            [i for i in ids for _ in range(5)],
            captions,
            captions_per_image=5,
        )
        if split != "gallery":
            all_captions.extend(captions)
    paths["vocab"] = build_vocabulary(all_captions, min_count=1).save(root / "vocab.json")
    return paths


def train_model(paths: dict[str, Path], out: Path, args: argparse.Namespace) -> Path:
    from pipeline.params import TrainParams
    from pipeline.train import RunPaths, train

    params = TrainParams(
        model="scan_t2i_avg",
        embed_size=args.embed_size,
        word_dim=128,
        epochs=args.epochs,
        lr=args.lr,
        lr_update=max(args.epochs, 1),
        batch_size=args.batch_size,
        raw_feature_norm=args.raw_feature_norm,
        device="cpu",
        amp=False,
        val_max_images=100,
        max_violation=args.max_violation,
        seed=args.seed,
    )
    train(
        params,
        features_dir=paths["train_features"],
        train_captions=paths["train_captions"],
        val_captions=paths["val_captions"],
        vocab_path=paths["vocab"],
        out_dir=out,
        progress=args.progress,
        cache_dir=out / "cache",
    )
    return RunPaths(out).best


def recall(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (%) from 0-based ranks of the right image (a miss is a large rank)."""
    return {f"r{n}": float(100.0 * (ranks < n).mean()) for n in (1, 5, 10)}


def evaluate(
    searcher: Any, queries: list[str], truth: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    from pipeline.search import SearchOptions

    encoded = [searcher.encode_text(text) for text in queries]
    shards = searcher.index.images
    rows, lengths = shards.gather(np.arange(shards.count))
    images = torch.from_numpy(rows)
    exact = np.empty((len(queries), shards.count), dtype=np.float32)
    started = time.perf_counter()
    region_lengths = None if bool((lengths == rows.shape[1]).all()) else torch.from_numpy(lengths)
    with torch.no_grad():
        for start in range(0, len(encoded), 32):
            batch = encoded[start : start + 32]
            longest = max(int(q.lengths[0]) for q in batch)
            caps = torch.zeros(len(batch), longest, images.shape[2])
            for slot, q in enumerate(batch):
                caps[slot, : int(q.lengths[0])] = q.embedding[0, : int(q.lengths[0])]
            cap_lengths = torch.cat([q.lengths for q in batch])
            scores = searcher.model.similarity(images, caps, cap_lengths, region_lengths)
            exact[start : start + len(batch)] = scores.t().numpy()
    exact_seconds = time.perf_counter() - started
    order = np.argsort(-exact, axis=1, kind="stable")
    top10 = order[:, :10]
    exact_rank = np.argmax(order == truth[:, None], axis=1)

    def sweep(options: SearchOptions, ks: tuple[int, ...], maxsim: bool = False) -> list[dict[str, Any]]:
        rows_out = []
        lists = searcher.index.image_lists
        for k in ks:
            kept, ranks, seconds = [], [], 0.0
            for qi, q in enumerate(encoded):
                t0 = time.perf_counter()
                if maxsim:  # the second stage without the model: centroid MaxSim
                    words = q.embedding[0, : int(q.lengths[0])].numpy()
                    positions, _ = lists.shortlist(
                        words, k, nprobe=options.nprobe, candidates=options.pool(k)
                    )
                else:
                    positions, _ = searcher.image_shortlist(q, k, options)
                seconds += time.perf_counter() - t0
                kept.append(len(np.intersect1d(positions, top10[qi])) / 10.0)
                ranked = positions[np.argsort(-exact[qi, positions], kind="stable")]
                hit = np.flatnonzero(ranked == truth[qi])
                ranks.append(hit[0] if len(hit) else 10**9)
            rows_out.append(
                {"k": k, "kept_top10": 100.0 * float(np.mean(kept)), "min_kept": 100.0 * float(np.min(kept)),
                 **recall(np.array(ranks)), "shortlist_ms": 1000.0 * seconds / len(encoded)}
            )  # fmt: skip
        return rows_out

    default = SearchOptions()
    table = sweep(default, K_VALUES)
    ablation = []
    for nprobe in (2, 4, 16):
        ablation.append({"variant": f"nprobe {nprobe}", **sweep(replace(default, nprobe=nprobe), (128,))[0]})
    for pool in (1024, 4096):
        ablation.append(
            {"variant": f"candidates {pool}", **sweep(replace(default, candidates=pool), (128,))[0]}
        )
    lists = searcher.index.image_lists
    residuals, lists.residuals = lists.residuals, None
    ablation.append({"variant": "no residual codes", **sweep(default, (128,))[0]})
    lists.residuals = residuals
    ablation.append({"variant": "second stage: centroid MaxSim", **sweep(default, (128,), maxsim=True)[0]})
    # The real search path on a few queries: its hits are the shortlist ordered by exact score.
    checked, latencies = 0, []
    for qi in range(min(20, len(queries))):
        result = searcher.text(queries[qi], SearchOptions())
        latencies.append(result.timings_ms)
        positions, _ = searcher.image_shortlist(encoded[qi], 128, default)
        expected = positions[np.argsort(-exact[qi, positions], kind="stable")][:10]
        checked += int([hit.position for hit in result.hits] == expected.tolist())
    return {
        "exact": {**recall(exact_rank), "seconds": exact_seconds, "pairs": int(exact.size)},
        "table": table,
        "ablation": ablation,
        "search_checked": f"{checked}/{min(20, len(queries))}",
        "latency_ms": {key: float(np.median([t[key] for t in latencies])) for key in latencies[0]},
    }


def markdown(report: dict[str, Any]) -> str:
    exact = report["exact"]
    lines = [
        "| k | exact top-10 kept | worst query | two-stage R@1 | R@5 | R@10 | shortlist ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["table"]:
        lines.append(
            f"| {row['k']} | {row['kept_top10']:.2f} % | {row['min_kept']:.0f} % | {row['r1']:.1f} | "
            f"{row['r5']:.1f} | {row['r10']:.1f} | {row['shortlist_ms']:.2f} |"
        )
    lines.append(
        f"| exact (all {report['gallery']:,}) | 100 % | | {exact['r1']:.1f} | {exact['r5']:.1f} | "
        f"{exact['r10']:.1f} | |"
    )
    lines += [
        "",
        "| k = 128 | exact top-10 kept | worst query | R@1 | R@5 | R@10 | shortlist ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["ablation"]:
        label = row["variant"]
        lines.append(
            f"| {label} | {row['kept_top10']:.2f} % | {row['min_kept']:.0f} % | {row['r1']:.1f} | "
            f"{row['r5']:.1f} | {row['r10']:.1f} | {row['shortlist_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--gallery", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-violation", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--raw-feature-norm", default="softmax")
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--search-threads", type=int, default=1, help="torch threads once trained")
    parser.add_argument("--clutter", type=int, default=20)
    parser.add_argument("--img-dim", type=int, default=128)
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse --workdir's data and trained model")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="search-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        splits = {"train": args.train_images, "val": 200, "gallery": args.gallery}
        if args.reuse:  # what an earlier run with the same options wrote
            paths = {f"{split}_captions": workdir / split / "captions.parquet" for split in splits}
            paths.update(
                train_features=workdir / "train" / "features",
                val_features=workdir / "train" / "features",
                gallery_features=workdir / "gallery" / "features",
                vocab=workdir / "vocab.json",
            )
            checkpoint = workdir / "run" / "checkpoints" / "best"
            shutil.rmtree(workdir / "index", ignore_errors=True)
        else:
            t0 = time.perf_counter()
            paths = make_concept_data(workdir, splits, args)
            timings["data_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint = train_model(paths, workdir / "run", args)
            timings["train_s"] = time.perf_counter() - t0
        torch.set_num_threads(args.search_threads)  # small per-query tensors: one thread is faster here
        from pipeline.index.build import build_index
        from pipeline.search import Searcher

        t0 = time.perf_counter()
        build = build_index(
            checkpoint,
            paths["gallery_features"],
            workdir / "index",
            nlist=args.nlist,
            device="cpu",
            cache_dir=workdir / "cache",
            progress=args.progress,
        )
        timings["index_s"] = time.perf_counter() - t0
        from pipeline.captions import read_captions

        searcher = Searcher.open(workdir / "index", device="cpu")
        captions = read_captions(paths["gallery_captions"])
        n = min(args.queries, args.gallery)
        queries = [captions.captions[5 * i] for i in range(n)]
        positions = {
            image_id: p for p, image_id in enumerate(searcher.index.image_ids(np.arange(args.gallery)))
        }
        truth = np.array([positions[captions.image_ids[5 * i]] for i in range(n)])
        t0 = time.perf_counter()
        report = evaluate(searcher, queries, truth, args)
        timings["evaluate_s"] = time.perf_counter() - t0
        report.update(
            gallery=args.gallery,
            queries=n,
            timings=timings,
            index_stats=build.meta.stats,
            date=datetime.date.today().isoformat(),
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
            torch=torch.__version__,
            command=" ".join(["python3", *sys.argv]),
        )
        print(json.dumps({k: v for k, v in report.items() if k not in ("table", "ablation")}, indent=2))
        print(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
