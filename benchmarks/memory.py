"""Peak anonymous memory of the training data path for 5,000 vs 20,000 images (target < 2 GB, flat in N).

The original SCAN loads the whole feature array into RAM (62 GB for COCO). Here features stay in the
memory-mapped table, so anonymous memory should not grow with the dataset. This script:

1. generates a 20,000-image feature set once (36 x 2048 float16 per image, random; written with
   `FeatureStoreWriter`, ~2.9 GB) with 5 captions per image, plus its memory-mapped cache (~2.9 GB);
2. for each size, in a FRESH subprocess (so one size's allocations cannot hide the other's), streams one full
   epoch of training batches through the real data path (mmap table + `PairDataset` + `EpochBatchSampler` +
   DataLoader + collate) over that many images' captions, and runs a few optimizer steps of a small SCAN on
   some of the batches;
3. samples `RssAnon` from /proc/self/status in a thread every 10 ms (anonymous memory only: the page cache
   holding the mapped features is reclaimable and not counted) and prints a table with the ratio 20k/5k.

    python3 benchmarks/memory.py [--sizes 5000 20000] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

WORDS = (
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "street",
    "red",
    "blue",
    "sitting",
    "standing",
    "walking",
    "near",
    "with",
    "the",
    "on",
    "in",
    "of",
    "two",
    "people",
    "car",
    "bike",
    "tree",
    "grass",
    "water",
    "beach",
    "table",
    "food",
    "plate",
    "child",
    "ball",
    "playing",
    "large",
    "small",
    "white",
    "black",
    "green",
)


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only)")


class PeakSampler:
    """Samples RssAnon in a background thread and keeps the maximum."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def generate(workdir: Path, num_images: int, regions: int, dim: int, seed: int) -> dict[str, str]:
    """Write the feature store, the captions of every size prefix, the vocabulary and the mmap cache."""
    import numpy as np
    from rich.progress import Progress

    from pipeline.captions import write_captions
    from pipeline.loaders import open_feature_table
    from pipeline.store import RegionRecord
    from pipeline.store_writer import FeatureStoreWriter
    from pipeline.vocab import build_vocabulary

    store = workdir / "features"
    rng = np.random.default_rng(seed)
    boxes = np.tile(np.array([0, 0, 99, 99], dtype=np.float32), (regions, 1))
    image_ids = [f"images/{index:06d}.jpg" for index in range(num_images)]
    with (
        Progress() as progress,
        FeatureStoreWriter(store, feature_dtype="float16", rows_per_part=512) as writer,
    ):
        task = progress.add_task("write features", total=num_images)
        for image_id in image_ids:
            features = rng.standard_normal((regions, dim), dtype=np.float32).astype(np.float16)
            writer.add(
                RegionRecord(image_id=image_id, image_w=100, image_h=100, boxes=boxes, features=features)
            )
            progress.advance(task)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(5 * num_images)]
    caption_ids = [image_id for image_id in image_ids for _ in range(5)]
    write_captions(workdir / "captions.parquet", caption_ids, captions, captions_per_image=5)
    build_vocabulary(captions, min_count=4).save(workdir / "vocab.json")
    started = time.perf_counter()
    open_feature_table(store, workdir / "cache")  # converted once here, so children only map it
    print(f"memory-mapped cache built in {time.perf_counter() - started:.1f} s")
    return {
        "store": str(store),
        "captions": str(workdir / "captions.parquet"),
        "vocab": str(workdir / "vocab.json"),
    }


def child(args: argparse.Namespace) -> None:
    """One measurement: one epoch of batches over `args.size` images, a few optimizer steps, peak RssAnon."""
    import torch

    from pipeline.captions import read_captions
    from pipeline.loaders import (
        EpochBatchSampler,
        PairDataset,
        map_image_ids,
        open_feature_table,
        pair_loader,
        tokenize_captions,
    )
    from pipeline.models.build import create_model
    from pipeline.models.losses import hardest_negative_triplet_loss
    from pipeline.vocab import Vocabulary

    torch.set_num_threads(1)
    baseline = rss_anon_bytes()
    with PeakSampler() as sampler:
        started = time.perf_counter()
        table = open_feature_table(args.store, Path(args.workdir) / "cache")
        captions = read_captions(args.captions)
        count = args.size * captions.captions_per_image
        vocab = Vocabulary.load(args.vocab)
        tokens = tokenize_captions(captions.captions[:count], vocab)
        rows = map_image_ids(
            table, captions.image_ids[:count], captions_source=args.captions, features_source=args.store
        )
        del captions
        dataset = PairDataset(table, rows, tokens)
        batch_sampler = EpochBatchSampler(len(dataset), args.batch_size, seed=0, epoch=0)
        loader = pair_loader(dataset, batch_sampler, num_workers=0)
        torch.manual_seed(0)
        model = create_model(
            "scan_t2i_avg", vocab_size=len(vocab), img_dim=table.feature_dim, embed_size=256, word_dim=300
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        step_every = max(1, len(batch_sampler) // max(args.steps, 1))
        batches = steps = 0
        checksum = 0.0
        for batch in loader:
            batches += 1
            checksum += float(batch.region_features[:, 0, 0].sum())  # touch the data
            if batches % step_every == 0 and steps < args.steps:
                optimizer.zero_grad(set_to_none=True)
                scores = model(
                    batch.region_features, batch.region_lengths, batch.caption_inputs, batch.caption_lengths
                )
                hardest_negative_triplet_loss(scores, margin=0.2, max_violation=True).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                optimizer.step()
                steps += 1
        elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "size": args.size,
                "pairs": len(dataset),
                "batches": batches,
                "optimizer_steps": steps,
                "baseline_rss_anon": baseline,
                "peak_rss_anon": sampler.peak,
                "seconds": elapsed,
                "pairs_per_s": len(dataset) / elapsed,
                "checksum": checksum,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per epoch")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse/keep the generated data here")
    parser.add_argument("--keep", action="store_true", help="keep a temporary workdir")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--captions", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from rich.console import Console
    from rich.table import Table

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scan-pipe-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        largest = max(args.sizes)
        marker = workdir / "generated.json"
        if marker.is_file() and json.loads(marker.read_text()).get("num_images") == largest:
            paths = json.loads(marker.read_text())["paths"]
        else:
            started = time.perf_counter()
            paths = generate(workdir, largest, args.regions, args.dim, seed=0)
            marker.write_text(json.dumps({"num_images": largest, "paths": paths}))
            print(f"generated {largest} images in {time.perf_counter() - started:.1f} s under {workdir}")
        results = []
        for size in args.sizes:
            command = [
                sys.executable, str(Path(__file__).resolve()), "--child", "--size", str(size),
                "--store", paths["store"], "--captions", paths["captions"], "--vocab", paths["vocab"],
                "--workdir", str(workdir), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            ]  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise SystemExit(f"child for {size} images failed:\n{completed.stderr[-4000:]}")
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        table = Table(title="Training data path: peak anonymous memory (RssAnon)")
        for column in (
            "images",
            "pairs",
            "batches",
            "opt. steps",
            "RssAnon after imports",
            "peak RssAnon",
            "s",
            "pairs/s",
        ):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(
                f"{r['size']:,}", f"{r['pairs']:,}", str(r["batches"]), str(r["optimizer_steps"]),
                f"{r['baseline_rss_anon'] / 2**20:,.0f} MiB", f"{r['peak_rss_anon'] / 2**20:,.0f} MiB",
                f"{r['seconds']:.1f}", f"{r['pairs_per_s']:,.0f}",
            )  # fmt: skip
        console = Console()
        console.print(table)
        if len(results) >= 2:
            ratio = results[-1]["peak_rss_anon"] / results[0]["peak_rss_anon"]
            console.print(
                f"peak RssAnon ratio {results[-1]['size']:,} / {results[0]['size']:,} images: {ratio:.3f}"
            )
        worst = max(r["peak_rss_anon"] for r in results)
        console.print(
            f"largest peak {worst / 2**30:.2f} GiB: "
            f"{'within' if worst < 2 * 2**30 else 'ABOVE'} the 2 GB target"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
