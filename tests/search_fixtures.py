"""Helpers of the index and search tests: small random SCAN/MMCA checkpoints, their indexes, tiny JPEGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from synthetic import SyntheticDataset

from pipeline.checkpoint import save_checkpoint
from pipeline.index.build import build_index
from pipeline.models.build import create_model
from pipeline.vocab import Vocabulary


def scan_checkpoint(
    out: Path, data: SyntheticDataset, model_name: str = "scan_t2i_avg", *, seed: int = 0, **options: Any
) -> Path:
    """An untrained SCAN of the dataset's sizes, saved as a checkpoint with the dataset's vocabulary."""
    vocab = Vocabulary.load(data.vocab_path)
    config = {"vocab_size": len(vocab), "img_dim": data.img_dim, "embed_size": 16, "word_dim": 8, **options}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(model_name, **config)
    return save_checkpoint(
        out, model, model_name=model_name, model_config=model.config, epoch=0, vocab_path=data.vocab_path
    )


def mmca_checkpoint(out: Path, data: SyntheticDataset, *, seed: int = 0) -> Path:
    """An untrained small MMCA reading the bundled MiniLM (whose identity the checkpoint records)."""
    from pipeline.bert_text import bert_identity, resolve_bert_path
    from pipeline.text_inputs import BERT_EXTRA_KEY

    identity = bert_identity(resolve_bert_path("sample"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(
            "mmca",
            img_dim=data.img_dim,
            bert_dim=identity.hidden_size,
            embed_size=16,
            num_heads=2,
            cnn_filters=8,
        )
    return save_checkpoint(
        out,
        model,
        model_name="mmca",
        model_config=model.config,
        epoch=0,
        extra={BERT_EXTRA_KEY: identity.to_json()},
    )


def write_jpegs(root: Path, image_ids: list[str], size: int = 64) -> Path:
    """A tiny JPEG per image id (a colour per image) under `root`."""
    rng = np.random.default_rng(0)
    for image_id in image_ids:
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (size, size), colour).save(path, format="JPEG")
    return root


def built_index(
    data: SyntheticDataset, checkpoint: Path, out: Path, *, shard_size: int, **options: Any
) -> Path:
    """The index of the dataset's store and test captions at `out` (built once: reused when it exists)."""
    if not out.exists():
        build_index(
            checkpoint,
            data.features_dir,
            out,
            shard_size=shard_size,
            captions=data.captions["test"],
            cache_dir=data.root / "cache",
            progress=False,
            device="cpu",
            **options,
        )
    return out
