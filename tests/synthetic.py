"""Synthetic region features from which the captions are derivable, for training and CLI tests.

Every concept ("dog", "kite", ...) is a random unit vector in feature space tied to one word. An image holds a
few distinct concepts, each as one region (the concept vector, scaled, plus noise), among pure-noise
background regions in random order. Its captions name its concepts in varying order between filler words.
Object sets are unique across all splits, so held-out test images are new combinations of known concepts and
a model can only retrieve them by aligning words with regions, which is what SCAN's cross attention learns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.captions import write_captions
from pipeline.store import RegionRecord
from pipeline.store_writer import FeatureStoreWriter
from pipeline.vocab import build_vocabulary

CONCEPT_WORDS = (
    "dog", "cat", "horse", "bike", "car", "tree", "kite", "boat", "ball", "chair",
    "table", "lamp", "bird", "train", "bench", "clock", "cup", "hat", "shoe", "bag",
    "apple", "pizza", "phone", "sofa", "bus", "cow", "sheep", "truck", "vase", "bowl",
)  # fmt: skip
FILLER_WORDS = ("a", "the", "with", "and", "near", "some", "photo", "of", "there", "is")


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset: one feature store, a captions table per split, a vocabulary."""

    root: Path
    features_dir: Path
    captions: dict[str, Path]  # split name -> captions.parquet
    vocab_path: Path
    image_ids: dict[str, list[str]]
    img_dim: int
    concepts: np.ndarray  # (num_concepts, img_dim) unit vectors


def _unique_object_sets(
    rng: np.random.Generator, count: int, num_concepts: int, per_image: int
) -> list[tuple[int, ...]]:
    seen: set[tuple[int, ...]] = set()
    sets: list[tuple[int, ...]] = []
    while len(sets) < count:
        chosen = tuple(sorted(rng.choice(num_concepts, size=per_image, replace=False).tolist()))
        if chosen not in seen:
            seen.add(chosen)
            sets.append(chosen)
    return sets


def _caption(rng: np.random.Generator, objects: tuple[int, ...]) -> str:
    words: list[str] = []
    for concept in rng.permutation(objects):
        words.extend(rng.choice(FILLER_WORDS, size=int(rng.integers(0, 3))).tolist())
        words.append(CONCEPT_WORDS[int(concept)])
    words.extend(rng.choice(FILLER_WORDS, size=int(rng.integers(0, 2))).tolist())
    return " ".join(words)


def make_synthetic_dataset(
    root: str | Path,
    *,
    splits: dict[str, int] | None = None,
    num_concepts: int = 20,
    objects_per_image: int = 3,
    regions_per_image: int = 6,
    img_dim: int = 64,
    captions_per_image: int = 5,
    object_scale: float = 3.0,
    noise: float = 0.3,
    variable_regions: bool = False,
    seed: int = 0,
) -> SyntheticDataset:
    """Write a feature store (all splits), `<split>/captions.parquet` and `vocab.json` (train + val words).

    `variable_regions` gives images between `objects_per_image` and `regions_per_image` regions, to exercise
    region masking (the adaptive-box case).
    """
    if num_concepts > len(CONCEPT_WORDS):
        raise ValueError(f"at most {len(CONCEPT_WORDS)} concepts")
    splits = splits or {"train": 200, "val": 40, "test": 100}
    root = Path(root)
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((num_concepts, img_dim))
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    object_sets = _unique_object_sets(rng, sum(splits.values()), num_concepts, objects_per_image)
    features_dir = root / "features"
    captions_paths: dict[str, Path] = {}
    image_ids: dict[str, list[str]] = {}
    all_captions: dict[str, list[str]] = {}
    position = 0
    with FeatureStoreWriter(
        features_dir, feature_dtype="float16", rows_per_part=64, row_group_size=32
    ) as writer:
        for split, count in splits.items():
            ids: list[str] = []
            captions: list[str] = []
            for index in range(count):
                objects = object_sets[position]
                position += 1
                num_regions = (
                    int(rng.integers(objects_per_image, regions_per_image + 1))
                    if variable_regions
                    else regions_per_image
                )
                regions = noise * rng.standard_normal((num_regions, img_dim))
                regions[: len(objects)] += object_scale * concepts[list(objects)]
                regions = regions[rng.permutation(num_regions)]
                image_id = f"{split}/{index:05d}.jpg"
                writer.add(
                    RegionRecord(
                        image_id=image_id,
                        image_w=64,
                        image_h=64,
                        boxes=np.tile(np.array([0, 0, 63, 63], dtype=np.float32), (num_regions, 1)),
                        features=regions.astype(np.float16),
                    )
                )
                ids.append(image_id)
                captions.extend(_caption(rng, objects) for _ in range(captions_per_image))
            path = root / split / "captions.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_captions(
                path,
                [i for i in ids for _ in range(captions_per_image)],
                captions,
                captions_per_image=captions_per_image,
            )
            captions_paths[split] = path
            image_ids[split] = ids
            all_captions[split] = captions
    vocab_words = [c for split in ("train", "val") if split in all_captions for c in all_captions[split]]
    vocab_path = build_vocabulary(vocab_words, min_count=1).save(root / "vocab.json")
    return SyntheticDataset(
        root=root,
        features_dir=features_dir,
        captions=captions_paths,
        vocab_path=vocab_path,
        image_ids=image_ids,
        img_dim=img_dim,
        concepts=concepts,
    )
