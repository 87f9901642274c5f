"""Cross-attention scoring: blockwise `xattn_scores` vs a per-caption loop with the original's structure.

Both run in the same process on the same random data (region and word vectors L2-normalised, as encoder
output). The loop follows the official evaluation: for each caption, repeat it over all images, build the
attention, the attended vectors, the cosine, then aggregate. It is slow, so by default it is timed on a
subset of captions and its rate extrapolated (the output says so); its scores on that subset are compared
with the fast result (max abs difference). Fast and loop timings alternate in `--rounds` rounds so that
both see the same machine load; wall and process CPU time are both reported (one thread: CPU time is
the less load-sensitive number on a shared machine).

    python benchmarks/xattn.py --scale 0.1 --threads 1                      # Flickr30K test shape / 10
    python benchmarks/xattn.py --shape coco5k --device cuda --dtype bfloat16 --loop-captions 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host_info import cpu_name
from pipeline.models.config import RAW_FEATURE_NORMS
from pipeline.models.xattn import xattn_scores

SHAPES = {  # images, captions, regions, max words, embedding size
    "flickr30k": (1000, 5000, 36, 12, 1024),
    "coco5k": (5000, 25000, 36, 12, 1024),
}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DIRECTION_DEFAULTS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}  # published lambda_softmax, lambda_lse


def _first_norm(attn: Tensor, norm: str) -> Tensor:
    """Normalise (batch, context, query) scores over the query axis, as the original's func_attention."""
    if norm == "softmax":
        return torch.softmax(attn, dim=2)
    if norm.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    if norm.endswith("l2norm"):
        return attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
    if norm.endswith("l1norm"):
        return attn / (attn.abs().sum(dim=2, keepdim=True) + 1e-8)
    return attn  # clipped, no_norm


def _attend(query: Tensor, context: Tensor, norm: str, lambda_softmax: float) -> Tensor:
    """Attended context vectors (batch, query len, d), built explicitly as the original does."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (batch, context, query)
    attn = _first_norm(attn, norm)
    attn = attn.transpose(1, 2).contiguous()  # (batch, query, context)
    attn = torch.softmax(attn * lambda_softmax, dim=2)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2))  # (batch, d, query)
    return weighted.transpose(1, 2)


def _cosine(x1: Tensor, x2: Tensor) -> Tensor:
    return (x1 * x2).sum(dim=2) / (x1.norm(dim=2) * x2.norm(dim=2)).clamp(min=1e-8)


def loop_scores(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor,
    *,
    direction: str,
    raw_feature_norm: str,
    agg: str,
    lambda_softmax: float,
    lambda_lse: float,
) -> Tensor:
    """The original evaluation's structure: a Python loop over captions, every image at once per caption."""
    n_img = images.shape[0]
    columns = []
    for caption, length in zip(captions, caption_lengths.tolist(), strict=True):
        words = caption[:length].unsqueeze(0).repeat(n_img, 1, 1)  # (n_img, n_words, d)
        if direction == "t2i":
            attended = _attend(words, images, raw_feature_norm, lambda_softmax)
            row_sim = _cosine(words, attended)  # (n_img, n_words)
        else:
            attended = _attend(images, words, raw_feature_norm, lambda_softmax)
            row_sim = _cosine(images, attended)  # (n_img, regions)
        if agg == "LogSumExp":
            column = torch.log(torch.exp(row_sim * lambda_lse).sum(dim=1)) / lambda_lse
        elif agg == "Max":
            column = row_sim.max(dim=1).values
        elif agg == "Sum":
            column = row_sim.sum(dim=1)
        else:
            column = row_sim.mean(dim=1)
        columns.append(column)
    return torch.stack(columns, dim=1)


def _random_inputs(
    n_img: int, n_cap: int, regions: int, words: int, dim: int, seed: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, regions, dim, generator=generator), dim=-1)
    captions = F.normalize(torch.randn(n_cap, words, dim, generator=generator), dim=-1)
    lengths = torch.randint(max(1, words - 4), words + 1, (n_cap,), generator=generator)
    lengths[0] = words  # at least one caption uses the full padded length
    for index, length in enumerate(lengths.tolist()):
        captions[index, length:] = 0.0  # encoder output is zero at padding
    return images.to(device), captions.to(device), lengths.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="flickr30k")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink images and captions by this factor")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--direction", choices=["both", "t2i", "i2t"], default="both")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-size", type=int, nargs="+", default=None, help="images [captions] per block")
    parser.add_argument("--raw-feature-norm", choices=RAW_FEATURE_NORMS, default="clipped_l2norm")
    parser.add_argument("--agg", choices=["LogSumExp", "Mean", "Max", "Sum"], default="LogSumExp")
    parser.add_argument(
        "--loop-captions", type=int, default=100, help="captions the loop is timed on (0: all)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternations of fast and loop timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    console = Console(soft_wrap=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # exact float32 products for the difference check
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    n_img, n_cap, regions, words, dim = SHAPES[args.shape]
    n_img, n_cap = max(1, round(n_img * args.scale)), max(1, round(n_cap * args.scale))
    dtype = DTYPES[args.dtype]
    if args.block_size is not None and len(args.block_size) > 2:
        parser.error("--block-size takes one or two numbers: images [captions]")
    block_size = None if args.block_size is None else (args.block_size[0], args.block_size[-1])
    images, captions, lengths = _random_inputs(n_img, n_cap, regions, words, dim, args.seed, device)
    loop_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    images_fast, captions_fast = images.to(dtype), captions.to(dtype)
    images_loop, captions_loop = images_fast.to(loop_dtype), captions_fast.to(loop_dtype)
    n_loop = n_cap if args.loop_captions <= 0 else min(args.loop_captions, n_cap)
    directions = ["t2i", "i2t"] if args.direction == "both" else [args.direction]

    console.print(
        f"[bold]xattn benchmark[/] shape={args.shape} scale={args.scale}: {n_img} images x {n_cap} captions, "
        f"{regions} regions, {words} words max, d={dim}; dtype={args.dtype} (loop in {loop_dtype}), "
        f"device={device}, threads={torch.get_num_threads()}, block={block_size or 'default'}, "
        f"norm={args.raw_feature_norm}, agg={args.agg}"
    )
    console.print(
        f"host: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    # Fast and loop runs alternate in rounds (fast on a slice of the captions, then the loop on its share of
    # the timed captions), so both see the same machine load; wall and process CPU time are both reported.
    rounds = max(1, min(args.rounds, n_loop))
    fast_bounds = [round(n_cap * r / rounds) for r in range(rounds + 1)]
    loop_bounds = [round(n_loop * r / rounds) for r in range(rounds + 1)]
    totals = {"fast_wall": 0.0, "fast_cpu": 0.0, "loop_wall": 0.0, "loop_cpu": 0.0}
    with torch.inference_mode():
        for direction in directions:
            lambda_softmax, lambda_lse = DIRECTION_DEFAULTS[direction]
            options = dict(
                direction=direction,
                raw_feature_norm=args.raw_feature_norm,
                agg=args.agg,
                lambda_softmax=lambda_softmax,
                lambda_lse=lambda_lse,
            )
            # warm-up (allocator, kernels) on a small slice
            xattn_scores(images_fast[:4], captions_fast[:8], lengths[:8], block_size=block_size, **options)
            loop_scores(images_loop[:4], captions_loop[:2], lengths[:2], **options)
            _sync(device)
            fast_parts, loop_parts = [], []
            fast_wall = fast_cpu = loop_wall = loop_cpu = 0.0
            with Progress(
                TextColumn(f"{direction}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("fast", total=n_img * (n_cap + n_loop), rate="")

                def advance(pairs: int, task=task, progress=progress) -> None:
                    progress.update(task, advance=pairs)

                for r in range(rounds):
                    c0, c1 = fast_bounds[r], fast_bounds[r + 1]
                    wall, cpu = time.perf_counter(), time.process_time()
                    fast_parts.append(
                        xattn_scores(
                            images_fast,
                            captions_fast[c0:c1],
                            lengths[c0:c1],
                            block_size=block_size,
                            progress=advance,
                            **options,
                        )
                    )
                    _sync(device)
                    fast_wall += time.perf_counter() - wall
                    fast_cpu += time.process_time() - cpu
                    l0, l1 = loop_bounds[r], loop_bounds[r + 1]
                    wall, cpu = time.perf_counter(), time.process_time()
                    loop_parts.append(
                        loop_scores(images_loop, captions_loop[l0:l1], lengths[l0:l1], **options)
                    )
                    _sync(device)
                    loop_wall += time.perf_counter() - wall
                    loop_cpu += time.process_time() - cpu
                    progress.update(
                        task,
                        advance=n_img * (l1 - l0),
                        rate=f"fast {n_img * c1 / fast_wall:,.0f} loop {n_img * l1 / loop_wall:,.0f} pairs/s",
                    )
            fast = torch.cat(fast_parts, dim=1)
            loop = torch.cat(loop_parts, dim=1)
            extrapolate = n_cap / n_loop  # loop time for all captions
            totals["fast_wall"] += fast_wall
            totals["fast_cpu"] += fast_cpu
            totals["loop_wall"] += loop_wall * extrapolate
            totals["loop_cpu"] += loop_cpu * extrapolate
            difference = (fast[:, :n_loop].double() - loop.double()).abs().max().item()
            extrapolated = "" if n_loop == n_cap else f", timed on {n_loop} captions and extrapolated"
            console.print(
                f"{direction}: fast {n_img * n_cap / fast_wall:10,.0f} pairs/s ({fast_wall:8.2f} s wall, "
                f"{fast_cpu:8.2f} s cpu) | loop {n_img * n_loop / loop_wall:9,.0f} pairs/s "
                f"({loop_wall * extrapolate:8.2f} s wall, "
                f"{loop_cpu * extrapolate:8.2f} s cpu{extrapolated}) | "
                f"speed-up {loop_wall * extrapolate / fast_wall:5.1f}x wall, "
                f"{loop_cpu * extrapolate / max(fast_cpu, 1e-9):5.1f}x cpu | max abs diff {difference:.2e}"
            )
    if len(directions) > 1:
        console.print(
            f"both directions: fast {totals['fast_wall']:.2f} s wall / {totals['fast_cpu']:.2f} s cpu, "
            f"loop {totals['loop_wall']:.2f} s wall / {totals['loop_cpu']:.2f} s cpu, speed-up "
            f"[bold]{totals['loop_wall'] / totals['fast_wall']:.1f}x wall, "
            f"{totals['loop_cpu'] / max(totals['fast_cpu'], 1e-9):.1f}x cpu[/]"
        )
    console.print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
