"""Training: it learns (held-out recall), resumes to identical weights, and its data path is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import SyntheticDataset, make_synthetic_dataset

from pipeline.captions import write_captions
from pipeline.checkpoint import OPTIMIZER_FILE, load_model, read_checkpoint_info
from pipeline.evaluation import evaluate_run
from pipeline.loaders import (
    EpochBatchSampler,
    PairDataset,
    collate_pairs,
    map_image_ids,
    open_feature_table,
    tokenize_captions,
)
from pipeline.metrics import METRIC_KEYS
from pipeline.params import TrainParams
from pipeline.train import TrainingError, train
from pipeline.vocab import Vocabulary

# Small SCAN that learns the synthetic concepts in a few CPU seconds (i-t AVG learns fastest here).
LEARNING_PARAMS = TrainParams(
    model="scan_i2t_avg",
    embed_size=64,
    word_dim=32,
    epochs=4,
    lr=5e-3,
    lr_update=3,
    batch_size=32,
    val_max_images=40,
    seed=0,
)
TINY_PARAMS = TrainParams(
    model="scan_t2i_lse",
    embed_size=16,
    word_dim=8,
    epochs=2,
    lr=2e-3,
    batch_size=16,
    val_max_images=10,
    seed=3,
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def learning_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("learn"), splits={"train": 400, "val": 40, "test": 100}
    )


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("tiny"),
        splits={"train": 40, "val": 10, "test": 10},
        img_dim=16,
        num_concepts=10,
        variable_regions=True,
        seed=5,
    )


def _run(data: SyntheticDataset, params: TrainParams, out: Path, *, resume: bool = False):
    return train(
        params,
        features_dir=data.features_dir,
        train_captions=data.captions["train"],
        val_captions=data.captions["val"],
        vocab_path=data.vocab_path,
        out_dir=out,
        resume=resume,
        device="cpu",
        progress=False,
        cache_dir=data.root / "cache",
    )


def test_training_learns_held_out_pairs(learning_data: SyntheticDataset, tmp_path: Path) -> None:
    result = _run(learning_data, LEARNING_PARAMS, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    assert all(f"val_{key}" in history[0] for key in METRIC_KEYS)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [record["lr"] for record in history] == pytest.approx([5e-3, 5e-3, 5e-3, 5e-4])
    best_epoch = max(history, key=lambda record: record["val_rsum"])["epoch"]
    assert result.best_epoch == best_epoch == read_checkpoint_info(tmp_path / "run/checkpoints/best").epoch

    held_out = evaluate_run(
        [tmp_path / "run/checkpoints/last"],
        learning_data.features_dir,
        learning_data.captions["test"],
        device="cpu",
        progress=False,
        cache_dir=learning_data.root / "cache",
    )
    print(f"held-out R@1: i2t {held_out.metrics['i2t_r1']:.1f}  t2i {held_out.metrics['t2i_r1']:.1f}")
    assert held_out.metrics["num_images"] == 100
    assert held_out.metrics["i2t_r1"] >= 90.0
    assert held_out.metrics["t2i_r1"] >= 90.0


def test_resume_ends_with_identical_weights(tiny_data: SyntheticDataset, tmp_path: Path) -> None:
    _run(tiny_data, TINY_PARAMS, tmp_path / "straight")
    _run(tiny_data, TINY_PARAMS.model_copy(update={"epochs": 1}), tmp_path / "split")
    assert read_checkpoint_info(tmp_path / "split/checkpoints/last").epoch == 1
    resumed = _run(tiny_data, TINY_PARAMS, tmp_path / "split", resume=True)
    assert resumed.start_epoch == 1 and not resumed.nothing_to_do

    straight = load_model(tmp_path / "straight/checkpoints/last").state_dict()
    split = load_model(tmp_path / "split/checkpoints/last").state_dict()
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    assert (tmp_path / "straight/checkpoints/last" / OPTIMIZER_FILE).read_bytes() == (
        tmp_path / "split/checkpoints/last" / OPTIMIZER_FILE
    ).read_bytes()
    straight_log = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    split_log = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in split_log] == [1, 2]
    assert [r["train_loss"] for r in split_log] == [r["train_loss"] for r in straight_log]
    assert [r["val_rsum"] for r in split_log] == [r["val_rsum"] for r in straight_log]


def test_resume_edge_cases(tiny_data: SyntheticDataset, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        _run(tiny_data, TINY_PARAMS, tmp_path / "empty", resume=True)

    one_epoch = TINY_PARAMS.model_copy(update={"epochs": 1})
    _run(tiny_data, one_epoch, tmp_path / "run")
    weights = (tmp_path / "run/checkpoints/last/model.safetensors").read_bytes()
    finished = _run(tiny_data, one_epoch, tmp_path / "run", resume=True)
    assert finished.nothing_to_do and finished.epochs_completed == 1
    assert (tmp_path / "run/checkpoints/last/model.safetensors").read_bytes() == weights

    with pytest.raises(TrainingError, match="already holds a training run"):
        _run(tiny_data, one_epoch, tmp_path / "run")
    with pytest.raises(TrainingError, match="lr"):
        _run(tiny_data, TINY_PARAMS.model_copy(update={"lr": 1e-2}), tmp_path / "run", resume=True)


def test_captions_of_unknown_images_name_the_file(tiny_data: SyntheticDataset, tmp_path: Path) -> None:
    bad = tmp_path / "captions.parquet"
    write_captions(bad, ["not/stored.jpg"] * 5 + [tiny_data.image_ids["train"][0]] * 5, ["a dog"] * 10)
    with pytest.raises(TrainingError) as error:
        train(
            TINY_PARAMS.model_copy(update={"batch_size": 4}),
            features_dir=tiny_data.features_dir,
            train_captions=bad,
            val_captions=tiny_data.captions["val"],
            vocab_path=tiny_data.vocab_path,
            out_dir=tmp_path / "out",
            device="cpu",
            progress=False,
            cache_dir=tiny_data.root / "cache",
        )
    assert str(bad) in str(error.value) and "not/stored.jpg" in str(error.value)


def test_batch_larger_than_data_is_a_clear_error(tiny_data: SyntheticDataset, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="larger than the 200 training pairs"):
        _run(tiny_data, TINY_PARAMS.model_copy(update={"batch_size": 256}), tmp_path / "out")


def test_epoch_sampler_is_seeded_and_ranks_partition_the_global_batch() -> None:
    single = list(EpochBatchSampler(103, 10, seed=7, epoch=2))
    assert len(single) == 10 and all(len(batch) == 10 for batch in single)
    assert single == list(EpochBatchSampler(103, 10, seed=7, epoch=2))
    assert single != list(EpochBatchSampler(103, 10, seed=7, epoch=3))
    assert single != list(EpochBatchSampler(103, 10, seed=8, epoch=2))
    used = [index for batch in single for index in batch]
    assert len(set(used)) == 100 and set(used) <= set(range(103))

    rank0 = list(EpochBatchSampler(103, 10, seed=7, epoch=2, rank=0, world_size=2))
    rank1 = list(EpochBatchSampler(103, 10, seed=7, epoch=2, rank=1, world_size=2))
    for whole, first, second in zip(single, rank0, rank1, strict=True):
        assert first + second == whole and not set(first) & set(second)
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(103, 10, seed=0, world_size=3)


def test_pairs_are_read_padded_and_cast(tiny_data: SyntheticDataset) -> None:
    from pipeline.captions import read_captions

    table = open_feature_table(tiny_data.features_dir, tiny_data.root / "cache")
    captions = read_captions(tiny_data.captions["train"])
    vocab = Vocabulary.load(tiny_data.vocab_path)
    tokens = tokenize_captions(captions.captions, vocab)
    assert tokens.token_ids.dtype == np.int32 and len(tokens) == len(captions.captions)
    assert list(tokens.tokens(3)) == vocab.encode(captions.captions[3])

    rows = map_image_ids(table, captions.image_ids, captions_source="c", features_source="f")
    dataset = PairDataset(table, rows, tokens)
    batch = collate_pairs([dataset[i] for i in range(0, 40, 5)])  # 8 different images
    assert batch.region_features.dtype == torch.float32
    region_counts = [table.num_boxes(int(rows[i])) for i in range(0, 40, 5)]
    assert batch.region_lengths.tolist() == region_counts and len(set(region_counts)) > 1
    assert batch.region_features.shape[1] == max(region_counts)
    for slot, index in enumerate(range(0, 40, 5)):
        stored = np.asarray(table.features(int(rows[index])), dtype=np.float32)
        assert torch.equal(batch.region_features[slot, : region_counts[slot]], torch.from_numpy(stored))
        assert not batch.region_features[slot, region_counts[slot] :].any()
        length = int(batch.caption_lengths[slot])
        assert batch.caption_inputs[slot, :length].tolist() == vocab.encode(captions.captions[index])
        assert not batch.caption_inputs[slot, length:].any()
