"""MMCA exact evaluation: batched `MMCA.score_matrix` against a straightforward per-pair loop, and two-stage.

Both run in one process on the same random inputs and weights (paper sizes: d 256, 16 heads, F 256, 36
regions of 2048, BERT rows of 768, 12-20 tokens per caption; padded rows hold NaN). The baseline is what a
plain reading of mmca.md §2 gives: for each image, for each caption, the pair's valid rows alone go through
the region FC, the image self unit (i0), the text CNN (c0), the word FC and the cross unit (i1, c1); every
tensor of the formula is recomputed for that pair (heads are one batched matmul, the CNN is `F.conv1d`). It is
slow, so it runs on a subset of the pairs (images x captions, stated in the output) and its time is
extrapolated; its scores are compared with the batched ones on that subset (max abs difference, checked
against `--tolerance`). Batched and loop timings alternate in `--rounds` rounds so that both see the same
machine load; wall and process CPU time are both reported (CPU time is the less load-sensitive number on a
shared machine; on a GPU, wall time is the one that counts).

Then `two_stage_scores` (mmca.md §5.3) with k = 128 scaled like the captions, against the exact time: the
share of pairs it scores and the time ratio (its shortlisted scores must equal the exact ones).

Projections: the measured time per pair, linear in pairs, for Flickr30K 1K (1,000 x 5,000), COCO 1K (5 folds
of 1,000 x 5,000) and COCO 5K (5,000 x 25,000); and for one H100 from the FLOP counts of mmca.md §5.2 at an
assumed sustained rate (`--gpu-fp32-share` of 67 TFLOP/s FP32, `--gpu-tf32-share` of 495 TFLOP/s TF32 dense),
with and without an estimated memory-traffic term (the elementwise passes over the per-pair rows).

    python3 benchmarks/mmca_eval.py --scale 0.1 --threads 1                  # 100 images x 500 captions
    python3 benchmarks/mmca_eval.py --device cuda --scale 1 --loop-images 2 --loop-captions 100 --tf32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host_info import cpu_name
from pipeline.models.mmca import MMCA, MMCAConfig, load_reference_weights, reference_weight_shapes

FLICKR = (1000, 5000)  # images, captions of the Flickr30K 1K test split (the --scale base)
SPLITS = {  # pairs scored by the protocol
    "Flickr30K 1K": 1000 * 5000,
    "COCO 1K (5 folds)": 5 * 1000 * 5000,
    "COCO 5K": 5000 * 25000,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
H100_FP32, H100_TF32, H100_HBM = 67e12, 495e12, 3.35e12  # FLOP/s FP32, TF32 dense; bytes/s HBM3 (SXM)
SPEC_REGIONS, SPEC_TOKENS = 36, 15  # the reference point of mmca.md §5.2


# ---- FLOP and traffic counts (mmca.md §5.2; one MAC = 2 FLOP) -------------------------------------------
def fast_pair_flop(k: float, n: float, d: int, f: int) -> float:
    """§5.2 "per pair, with per-item Q/K/V": logits and A.V (T^2 d each), W_O (T d^2), FFN (2 T d^2), cross
    CNN (6 n d F) and FC (3 F d), in MAC, plus ~0.45 MFLOP of softmax and LayerNorm at T = 51."""
    t = k + n
    macs = 2 * t * t * d + 3 * t * d * d + 6 * n * d * f + 3 * f * d
    return 2 * macs + 0.45e6 * (t / 51) ** 2


def item_flop(k: float, n: float, config: MMCAConfig) -> tuple[float, float]:
    """Per image (region FC, self unit, cross Q/K/V) and per caption (text CNN + FC, word FC, cross Q/K/V)."""
    d, g, big_d, f = config.embed_size, config.img_dim, config.bert_dim, config.cnn_filters
    image = k * g * d + 6 * k * d * d + 2 * k * k * d + 3 * k * d * d
    caption = 6 * n * big_d * f + 3 * f * d + n * big_d * d + 3 * n * d * d
    return 2 * image, 2 * caption


def naive_pair_flop(k: float, n: float, config: MMCAConfig) -> float:
    """What the per-pair loop computes for one pair: both items' work and the cross unit with its own Q/K/V
    (the items' cross Q/K/V in `item_flop` are exactly the naive pair's 3 T d^2)."""
    image, caption = item_flop(k, n, config)
    return image + caption + fast_pair_flop(k, n, config.embed_size, config.cnn_filters)


def pair_bytes(k: float, n: float, d: int, heads: int, f: int, itemsize: int) -> float:
    """Estimated memory traffic of the batched path per pair: ~34 passes over the (k + n, d) rows (gathers,
    merge, W_O, residuals, LayerNorms, FFN), ~14 over the (h, k, n) cross logits, ~15 over the (n, F) taps.
    Blocks of thousands of pairs do not fit a GPU's L2, so each pass goes to HBM."""
    return itemsize * (34 * (k + n) * d + 14 * heads * k * n + 15 * n * f)


# ---- the straightforward per-pair definition (mmca.md §2, read literally) --------------------------------
def _l2(x: Tensor) -> Tensor:
    return x / (torch.linalg.vector_norm(x) + 1e-8)


def _unit(x: Tensor, w: Mapping[str, Tensor], unit: str, heads: int) -> Tensor:
    """§2.1 on the valid rows `(T, d)`: Q/K/V, one softmax per head, W_O, post-LN, FFN, post-LN."""
    tokens, d = x.shape
    split = (tokens, heads, d // heads)
    q, k, v = (
        F.linear(x, w[f"{unit}.attention.{part}.weight"]).view(split).transpose(0, 1)
        for part in ("query", "key", "value")
    )
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1)
    attended = F.linear(
        (attention @ v).transpose(0, 1).reshape(tokens, d), w[f"{unit}.attention.output.weight"]
    )
    x1 = F.layer_norm(x + attended, (d,), w[f"{unit}.norm1.weight"], w[f"{unit}.norm1.bias"], 1e-5)
    hidden = F.relu(F.linear(x1, w[f"{unit}.ffn.fc1.weight"], w[f"{unit}.ffn.fc1.bias"]))
    ffn = F.linear(hidden, w[f"{unit}.ffn.fc2.weight"], w[f"{unit}.ffn.fc2.bias"])
    return F.layer_norm(x1 + ffn, (d,), w[f"{unit}.norm2.weight"], w[f"{unit}.norm2.bias"], 1e-5)


def _cnn(z: Tensor, w: Mapping[str, Tensor], head: str) -> Tensor:
    """§2.3: windows 1, 2, 3 over the n positions (l - 1 zero rows appended), ReLU, max, FC, l2."""
    rows = z.t()[None]  # (1, D_in, n)
    pooled = [
        F.relu(
            F.conv1d(F.pad(rows, (0, size - 1)), w[f"{head}.conv{size}.weight"], w[f"{head}.conv{size}.bias"])
        )
        .amax(dim=-1)
        .squeeze(0)
        for size in (1, 2, 3)
    ]
    return _l2(F.linear(torch.cat(pooled), w[f"{head}.fc.weight"], w[f"{head}.fc.bias"]))


def pair_score(regions: Tensor, words: Tensor, w: Mapping[str, Tensor], heads: int, alpha: float) -> Tensor:
    """S(i, c) of §2.5 from image i's valid region rows `(k, G)` and caption c's valid BERT rows `(n, D)`."""
    r = F.linear(regions, w["image_fc.weight"], w["image_fc.bias"])
    i0 = _l2(_unit(r, w, "image_self", heads).mean(dim=0))
    c0 = _cnn(words, w, "text_self")
    stacked = torch.cat([r, F.linear(words, w["word_fc.weight"], w["word_fc.bias"])])
    y = _unit(stacked, w, "cross", heads)
    i1, c1 = _l2(y[: regions.shape[0]].mean(dim=0)), _cnn(y[regions.shape[0] :], w, "text_cross")
    return i0 @ c0 + alpha * (i1 @ c1)


def loop_scores(
    pairs: list[tuple[int, int]],
    regions: Tensor,
    region_lengths: list[int],
    words: Tensor,
    word_lengths: list[int],
    w: Mapping[str, Tensor],
    config: MMCAConfig,
) -> Tensor:
    """The baseline: one pair at a time, each sliced to its valid rows."""
    return torch.stack(
        [
            pair_score(
                regions[i, : region_lengths[i]],
                words[c, : word_lengths[c]],
                w,
                config.num_heads,
                config.alpha,
            )
            for i, c in pairs
        ]
    )


# ---- inputs ------------------------------------------------------------------------------------------------
def random_weights(model: MMCA, seed: int) -> dict[str, np.ndarray]:
    """As the fixtures draw them: LayerNorm gains U(0.8, 1.2), biases N(0, 0.1), N(0, 1)/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in reference_weight_shapes(model).items():
        if ".norm" in name and name.endswith(".weight"):
            weights[name] = rng.uniform(0.8, 1.2, shape)
        elif name.endswith(".bias"):
            weights[name] = rng.normal(0.0, 0.1, shape)
        else:
            weights[name] = rng.normal(0.0, 1.0, shape) / math.sqrt(math.prod(shape[1:]))
    return weights


@dataclass
class Inputs:
    regions: Tensor  # (n_img, K, G), NaN in the padded rows
    region_lengths: Tensor
    words: Tensor  # (n_cap, N, D), NaN in the padded rows
    word_lengths: Tensor


def random_inputs(
    n_img: int, n_cap: int, regions: int, tokens: tuple[int, int], config: MMCAConfig, seed: int
) -> Inputs:
    """Pooled-ReLU-like region features (about 30% zeros) and BERT-like rows; padding holds NaN."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n_img, regions, config.img_dim, generator=generator)
    features[features < 0.3] = 0.0
    words = 0.5 * torch.randn(n_cap, tokens[1], config.bert_dim, generator=generator)
    word_lengths = torch.randint(tokens[0], tokens[1] + 1, (n_cap,), generator=generator)
    word_lengths[0] = tokens[1]
    for row, length in enumerate(word_lengths.tolist()):
        words[row, length:] = float("nan")
    return Inputs(features, torch.full((n_img,), regions), words, word_lengths)


# ---- reporting ---------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


class Clock:
    """Wall and process CPU time of the timed calls, synchronising the device around each."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def time(self, call: Callable[[], Tensor]) -> Tensor:
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        self._sync()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=0.1, help="Flickr30K 1K test (1,000 x 5,000) times this"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--block-size", type=int, nargs="+", default=None, help="images [captions] per block")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--tokens", type=int, nargs=2, default=(12, 20), help="min max tokens per caption")
    parser.add_argument("--loop-images", type=int, default=4, help="images the per-pair loop is timed on")
    parser.add_argument(
        "--loop-captions", type=int, default=250, help="captions the per-pair loop is timed on"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternations of batched and loop timing")
    parser.add_argument(
        "--k", type=int, default=None, help="two-stage shortlist (default 128 x captions/5,000)"
    )
    parser.add_argument("--skip-two-stage", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="on cuda: also time the batched path with TF32")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed |batched - loop|")
    parser.add_argument("--gpu-fp32-share", type=float, default=0.5, help="assumed share of H100 FP32 peak")
    parser.add_argument("--gpu-tf32-share", type=float, default=0.35, help="assumed share of H100 TF32 peak")
    parser.add_argument(
        "--gpu-hbm-share", type=float, default=0.8, help="assumed share of H100 HBM bandwidth"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.block_size is not None and len(args.block_size) > 2:
        parser.error("--block-size takes one or two numbers: images [captions]")

    console = Console(soft_wrap=True, highlight=False)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":  # exact float32 products for the difference check
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    block_size = None if args.block_size is None else (args.block_size[0], args.block_size[-1])
    n_img, n_cap = (max(1, round(size * args.scale)) for size in FLICKR)
    k = args.k or max(1, round(128 * n_cap / FLICKR[1]))
    config = MMCAConfig()  # the paper's sizes
    model = MMCA(config).to(device=device, dtype=dtype).eval()
    weights = random_weights(model, args.seed)
    load_reference_weights(model, weights)
    w = {name: torch.from_numpy(array).to(device=device, dtype=dtype) for name, array in weights.items()}
    data = random_inputs(n_img, n_cap, args.regions, tuple(args.tokens), config, args.seed)
    regions, words = data.regions.to(device, dtype), data.words.to(device, dtype)
    region_lengths, word_lengths = data.region_lengths.to(device), data.word_lengths.to(device)
    region_list, word_list = data.region_lengths.tolist(), data.word_lengths.tolist()
    loop_images, loop_captions = min(args.loop_images, n_img), min(args.loop_captions, n_cap)
    loop_pairs = [(i, c) for i in range(loop_images) for c in range(loop_captions)]
    mean_tokens = float(data.word_lengths.double().mean())

    console.print(
        f"[bold]MMCA evaluation benchmark[/] scale={args.scale}: {n_img} images x {n_cap} captions "
        f"({n_img * n_cap:,} pairs), {args.regions} regions, {args.tokens[0]}-{args.tokens[1]} tokens "
        f"(mean {mean_tokens:.1f}), d={config.embed_size}, h={config.num_heads}, F={config.cnn_filters}; "
        f"{args.dtype}, device={device}, threads={torch.get_num_threads()}, "
        f"block={block_size or 'default'}; per-pair loop on {loop_images} x {loop_captions} pairs"
    )
    host = f"{cpu_name()}, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        host = f"{torch.cuda.get_device_name(device)} (TF32 off), host {host}"
    console.print(
        f"host: {host}, torch {torch.__version__}, load average at start: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )

    rounds = max(1, min(args.rounds, n_cap, len(loop_pairs)))
    fast_bounds = [round(n_cap * r / rounds) for r in range(rounds + 1)]
    loop_bounds = [round(len(loop_pairs) * r / rounds) for r in range(rounds + 1)]
    fast_clock, loop_clock = Clock(device), Clock(device)
    fast_parts: list[Tensor] = []
    loop_parts: list[Tensor] = []
    with torch.inference_mode():
        # warm-up (allocator, kernels)
        model.score_matrix(
            regions[:2], region_lengths[:2], words[:8], word_lengths[:8], block_size=block_size
        )
        loop_scores(loop_pairs[:2], regions, region_list, words, word_list, w, config)
        with Progress(
            TextColumn("pairs"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("pairs", total=n_img * n_cap + len(loop_pairs), rate="")

            def advance(pairs: int) -> None:
                progress.update(task, advance=pairs)

            for r in range(rounds):
                c0, c1 = fast_bounds[r], fast_bounds[r + 1]
                fast_parts.append(
                    fast_clock.time(
                        lambda c0=c0, c1=c1: model.score_matrix(
                            regions,
                            region_lengths,
                            words[c0:c1],
                            word_lengths[c0:c1],
                            block_size=block_size,
                            progress=advance,
                        )
                    )
                )
                share = loop_pairs[loop_bounds[r] : loop_bounds[r + 1]]
                loop_parts.append(
                    loop_clock.time(
                        lambda share=share: loop_scores(
                            share, regions, region_list, words, word_list, w, config
                        )
                    )
                )
                progress.update(
                    task,
                    advance=len(share),
                    rate=f"batched {n_img * c1 / fast_clock.wall:,.0f} "
                    f"loop {loop_bounds[r + 1] / loop_clock.wall:,.1f} pairs/s",
                )
    scores = torch.cat(fast_parts, dim=1)
    loop = torch.cat(loop_parts)
    picked = scores[[i for i, _ in loop_pairs], [c for _, c in loop_pairs]]
    difference = (picked.double() - loop.double()).abs().max().item()

    pairs, n_loop = n_img * n_cap, len(loop_pairs)
    extrapolate = pairs / n_loop
    loop_wall, loop_cpu = loop_clock.wall * extrapolate, loop_clock.cpu * extrapolate
    fast_flop = pairs * fast_pair_flop(args.regions, mean_tokens, config.embed_size, config.cnn_filters)
    image_flop, caption_flop = item_flop(args.regions, mean_tokens, config)
    fast_flop += rounds * n_img * image_flop + n_cap * caption_flop  # images are encoded once per round
    naive_flop = pairs * naive_pair_flop(args.regions, mean_tokens, config)
    console.print(
        f"batched: {pairs / fast_clock.wall:10,.0f} pairs/s, {fast_clock.wall:8.2f} s wall, "
        f"{fast_clock.cpu:8.2f} s cpu, {fast_clock.wall / pairs * 1e3:.3f} ms/pair, "
        f"{fast_flop / fast_clock.wall / 1e9:6.1f} GFLOP/s (§5.2 count, "
        f"{fast_flop / pairs / 1e6:.1f} MFLOP/pair with the per-item work)"
    )
    console.print(
        f"loop:    {n_loop / loop_clock.wall:10,.1f} pairs/s, {loop_wall:8.2f} s wall, {loop_cpu:8.2f} s cpu "
        f"(timed on {n_loop:,} pairs, {loop_clock.wall:.2f} s, extrapolated), "
        f"{loop_clock.wall / n_loop * 1e3:.3f} ms/pair, {naive_flop / loop_wall / 1e9:6.1f} GFLOP/s "
        f"({naive_flop / pairs / 1e6:.1f} MFLOP/pair recomputed)"
    )
    passed = difference <= args.tolerance
    cpu_ratio = loop_cpu / max(fast_clock.cpu, 1e-9)
    console.print(
        f"[bold]speed-up {loop_wall / fast_clock.wall:.1f}x wall, {cpu_ratio:.1f}x cpu[/] | max abs diff "
        f"{difference:.2e} over {n_loop:,} pairs (|S| up to {picked.abs().max().item():.3f}; "
        f"tolerance {args.tolerance:.0e}: {'ok' if passed else 'EXCEEDED'})"
    )

    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        tf32_clock = Clock(device)
        with torch.inference_mode():
            model.score_matrix(
                regions[:2], region_lengths[:2], words[:8], word_lengths[:8], block_size=block_size
            )
            tf32 = tf32_clock.time(
                lambda: model.score_matrix(
                    regions, region_lengths, words, word_lengths, block_size=block_size
                )
            )
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        console.print(
            f"batched, TF32: {pairs / tf32_clock.wall:,.0f} pairs/s, {tf32_clock.wall:.2f} s wall, "
            f"{fast_clock.wall / tf32_clock.wall:.2f}x the float32 time; max abs diff to float32 "
            f"{(tf32.double() - scores.double()).abs().max().item():.2e}"
        )

    if not args.skip_two_stage:
        two_stage_clock, counted = Clock(device), []
        with torch.inference_mode():
            i2t, t2i = two_stage_clock.time(
                lambda: model.two_stage_scores(
                    regions,
                    region_lengths,
                    words,
                    word_lengths,
                    k,
                    block_size=block_size,
                    progress=counted.append,
                )
            )
        kept = torch.isfinite(i2t) | torch.isfinite(t2i)
        exact_equal = max(
            (matrix[torch.isfinite(matrix)].double() - scores[torch.isfinite(matrix)].double())
            .abs()
            .max()
            .item()
            for matrix in (i2t, t2i)
        )
        scored = sum(counted)
        console.print(
            f"two-stage k={k}: {scored:,} of {pairs:,} pairs scored ({scored / pairs:.1%}; at most "
            f"k x (images + captions) = {k * (n_img + n_cap):,}; {int(kept.sum()):,} kept), "
            f"{two_stage_clock.wall:.2f} s wall, {two_stage_clock.cpu:.2f} s cpu = "
            f"{two_stage_clock.wall / fast_clock.wall:.1%} of exact (wall); shortlisted scores vs exact: "
            f"max abs diff {exact_equal:.1e}"
        )

    # ---- projections --------------------------------------------------------------------------------------
    spec_flop = fast_pair_flop(SPEC_REGIONS, SPEC_TOKENS, config.embed_size, config.cnn_filters)
    traffic = pair_bytes(
        SPEC_REGIONS, SPEC_TOKENS, config.embed_size, config.num_heads, config.cnn_filters, 4
    )
    fp32_rate, tf32_rate = args.gpu_fp32_share * H100_FP32, args.gpu_tf32_share * H100_TF32
    hbm_rate = args.gpu_hbm_share * H100_HBM
    measured = "GPU" if device.type == "cuda" else "CPU"
    fast_us, loop_us = fast_clock.wall / pairs * 1e6, loop_clock.wall / n_loop * 1e6
    console.print(
        f"\nprojections, linear in pairs: {measured} measured here ({fast_us:.1f} us/pair batched, "
        f"{loop_us:.0f} us/pair loop, wall); one H100 (SXM) from mmca.md §5.2, "
        f"{spec_flop / 1e6:.1f} MFLOP/pair at k={SPEC_REGIONS}, n={SPEC_TOKENS}, assuming "
        f"{args.gpu_fp32_share:.0%} of 67 TFLOP/s FP32 = {fp32_rate / 1e12:.1f} TFLOP/s and "
        f"{args.gpu_tf32_share:.0%} of 495 TFLOP/s TF32 = {tf32_rate / 1e12:.0f} TFLOP/s sustained; "
        f"'+ traffic' adds ~{traffic / 1e6:.1f} MB/pair of elementwise passes at {args.gpu_hbm_share:.0%} of "
        f"3.35 TB/s = {hbm_rate / 1e12:.2f} TB/s (not overlapped)"
    )
    batched, looped = measured + " batched", measured + " loop"
    console.print(
        f"{'split':18s} {'pairs':>12s} {'TFLOP':>7s} | {batched:>12s} {looped:>12s} | "
        f"{'H100 FP32':>10s} {'+ traffic':>10s} {'H100 TF32':>10s} {'+ traffic':>10s}"
    )
    for name, split_pairs in SPLITS.items():
        flop = split_pairs * spec_flop
        memory = split_pairs * traffic / hbm_rate
        console.print(
            f"{name:18s} {split_pairs:12,d} {flop / 1e12:7.0f} | "
            f"{_duration(fast_clock.wall / pairs * split_pairs):>12s} "
            f"{_duration(loop_clock.wall / n_loop * split_pairs):>12s} | "
            f"{_duration(flop / fp32_rate):>10s} {_duration(flop / fp32_rate + memory):>10s} "
            f"{_duration(flop / tf32_rate):>10s} {_duration(flop / tf32_rate + memory):>10s}"
        )
    console.print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
