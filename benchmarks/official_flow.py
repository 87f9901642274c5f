"""How long the "reproduce SCAN from an official run" steps take, measured on a scaled shape and projected.

Steps, each through the library call its CLI command makes:
1. `import-precomp`: a synthetic `{split}_ims.npy` (float32, 36 x 2048, one row per image) + captions of
   `--images` images, converted to a feature store; images/s.
2. `import-official`: a synthetic official checkpoint at the published Flickr30K size (vocab 8,481, word_dim
   300, embed 1,024, bi-GRU), written as `torch.save` of the train.py dict; seconds.
3. `evaluate`: that model on the imported split (t2i LogSumExp and i2t Mean), all images x all captions;
   pairs/s of the whole evaluation (encoding + scoring + ranking).

The Flickr30K (1,000 x 5,000 pairs), COCO 1K (5 x 1,000 x 5,000) and COCO 5K (5,000 x 25,000) times are the
measured rates projected linearly in images (import) and pairs (evaluate); an ensemble costs the sum of its
members. Captions are random words of the vocabulary, 8-16 words as in Flickr30K.

    python3 benchmarks/official_flow.py [--images 200] [--threads 1] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.evaluation import evaluate_run  # noqa: E402
from pipeline.official_import import import_official  # noqa: E402
from pipeline.precomp import import_precomp  # noqa: E402

SHAPES = {  # images, captions per image, times the protocol scores such a block
    "Flickr30K 1K test": (1000, 5, 1),
    "COCO 1K (5 folds)": (1000, 5, 5),
    "COCO 5K": (5000, 5, 1),
}
FLICKR_TRAIN_IMAGES, COCO_TRAIN_IMAGES = 29000, 113287


def write_package(directory: Path, images: int, vocab_size: int, rng: np.random.Generator) -> None:
    """A precomp split and an official vocabulary of words `w<i>`."""
    features = rng.random((images, 36, 2048), dtype=np.float32)
    features[features < 0.3] = 0  # pooled ReLU outputs: about 30% zeros
    np.save(directory / "test_ims.npy", features)
    words = [f"w{index}" for index in range(vocab_size - 4)]
    lines = [" ".join(rng.choice(words, size=rng.integers(8, 17))) + " ." for _ in range(images * 5)]
    (directory / "test_caps.txt").write_text("\n".join(lines) + "\n")
    word2idx = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    word2idx.update({word: index + 4 for index, word in enumerate(words)})
    vocab = {"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()}, "idx": len(word2idx)}
    (directory / "f30k_precomp_vocab.json").write_text(json.dumps(vocab))


def write_official_checkpoint(path: Path, *, direction: str, agg: str, vocab_size: int) -> None:
    """What the official train.py saves, at the published size (our own file: safe to write with torch)."""
    embed, word_dim = 1024, 300
    gru = torch.nn.GRU(word_dim, embed, 1, batch_first=True, bidirectional=True)
    fc = torch.nn.Linear(2048, embed)
    text = OrderedDict([("embed.weight", torch.empty(vocab_size, word_dim).uniform_(-0.1, 0.1))])
    text.update((f"rnn.{key}", value.detach().clone()) for key, value in gru.state_dict().items())
    opt = argparse.Namespace(
        data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
        batch_size=128, word_dim=word_dim, embed_size=embed, grad_clip=2.0, num_layers=1,
        learning_rate=2e-4, lr_update=15, workers=10, log_step=10, val_step=500, logger_name="./runs/x/log",
        model_name="./runs/x", resume="", max_violation=True, img_dim=2048, no_imgnorm=False,
        no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func=agg, cross_attn=direction,
        precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0,
        lambda_softmax=9.0 if direction == "t2i" else 4.0, vocab_size=vocab_size,
    )  # fmt: skip
    state = OrderedDict((f"fc.{key}", value.detach().clone()) for key, value in fc.state_dict().items())
    torch.save({"epoch": 0, "model": [state, text], "best_rsum": 0.0, "opt": opt, "Eiters": 0}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=8481)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="official_flow_"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_package(workdir, args.images, args.vocab_size, rng)
    results: dict[str, object] = {"images": args.images, "threads": args.threads, "torch": torch.__version__}

    start = time.perf_counter()
    imported = import_precomp(workdir, "test", workdir / "store", progress=False, overwrite=True)
    results["import_precomp_images_per_s"] = args.images / (time.perf_counter() - start)

    evaluations = {}
    for direction, agg in (("t2i", "LogSumExp"), ("i2t", "Mean")):
        checkpoint = workdir / f"{direction}.pth.tar"
        write_official_checkpoint(checkpoint, direction=direction, agg=agg, vocab_size=args.vocab_size)
        start = time.perf_counter()
        vocab = workdir / "f30k_precomp_vocab.json"
        out = import_official(checkpoint, vocab, workdir / direction, overwrite=True)
        results[f"import_official_s_{direction}"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_run([out.out_dir], imported.store_dir, imported.captions_path, device="cpu", progress=False)
        seconds = time.perf_counter() - start
        evaluations[direction] = args.images * args.images * 5 / seconds
    results["evaluate_pairs_per_s"] = evaluations

    print(f"scaled shape: {args.images} images x {args.images * 5} captions, {args.threads} thread(s)")
    print(f"import-precomp: {results['import_precomp_images_per_s']:.0f} images/s")
    print(f"  -> Flickr30K train {FLICKR_TRAIN_IMAGES / results['import_precomp_images_per_s']:.0f} s, "
          f"COCO train {COCO_TRAIN_IMAGES / results['import_precomp_images_per_s']:.0f} s")  # fmt: skip
    for direction in ("t2i", "i2t"):
        print(f"import-official ({direction}): {results[f'import_official_s_{direction}']:.2f} s")
    projections = {}
    for direction, rate in evaluations.items():
        print(f"evaluate {direction}: {rate:,.0f} pairs/s")
        for shape, (images, per_image, blocks) in SHAPES.items():
            seconds = images * images * per_image * blocks / rate
            projections[f"{direction} {shape}"] = seconds
            print(f"  -> {shape}: {seconds / 60:.1f} min")
    results["projected_evaluate_s"] = projections
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
