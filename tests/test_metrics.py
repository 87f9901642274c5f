"""Recall metrics against the official fixtures, tie rules, protocols, chunking and output writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import metrics as metrics_module
from pipeline.metrics import (
    METRIC_KEYS,
    RetrievalRanks,
    evaluate_protocol,
    ranks_table,
    retrieval_metrics,
    retrieval_ranks,
    write_metrics_json,
    write_ranks_parquet,
)

# The official 13-vector order of a fold (fixture README §5.4).
FOLD_VECTOR = [
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
]


@pytest.fixture(scope="module")
def recall(scan_fixtures: Path) -> dict[str, np.ndarray]:
    with np.load(scan_fixtures / "recall.npz") as data:
        return {key: data[key] for key in data.files}


def _fold_vector(metrics: dict[str, float]) -> np.ndarray:
    ar = (metrics["i2t_r1"] + metrics["i2t_r5"] + metrics["i2t_r10"]) / 3
    ari = (metrics["t2i_r1"] + metrics["t2i_r5"] + metrics["t2i_r10"]) / 3
    return np.array([metrics[k] for k in FOLD_VECTOR] + [ar, ari, metrics["rsum"]])


def test_ranks_and_top1_match_official(recall: dict[str, np.ndarray]) -> None:
    ranks = retrieval_ranks(recall["sims"])
    np.testing.assert_array_equal(ranks.i2t_ranks, recall["i2t_ranks"])
    np.testing.assert_array_equal(ranks.t2i_ranks, recall["t2i_ranks"])
    np.testing.assert_array_equal(ranks.i2t_top1, recall["i2t_top1"])
    np.testing.assert_array_equal(ranks.t2i_top1, recall["t2i_top1"])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_metrics_match_official(recall: dict[str, np.ndarray], as_tensor: bool) -> None:
    scores = torch.from_numpy(recall["sims"]) if as_tensor else recall["sims"]
    metrics = retrieval_metrics(scores)
    assert list(metrics) == list(METRIC_KEYS)
    i2t = [metrics[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr")]
    t2i = [metrics[k] for k in ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr")]
    np.testing.assert_allclose(i2t, recall["i2t_metrics_r1_r5_r10_medr_meanr"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(t2i, recall["t2i_metrics_r1_r5_r10_medr_meanr"], rtol=0, atol=1e-9)
    assert metrics["rsum"] == pytest.approx(float(recall["rsum"]), abs=1e-9)
    assert _fold_vector(metrics)[10] == pytest.approx(float(recall["i2t_mean_recall_ar"]), abs=1e-9)
    assert _fold_vector(metrics)[11] == pytest.approx(float(recall["t2i_mean_recall_ari"]), abs=1e-9)


def test_coco_1k_folds_match_official(recall: dict[str, np.ndarray]) -> None:
    result = evaluate_protocol(recall["sims"], "coco_1k")
    assert result["images_per_fold"] == int(recall["fold5__images_per_fold"])
    assert len(result["folds"]) == 5
    per_fold = np.stack([_fold_vector(fold) for fold in result["folds"]])
    np.testing.assert_allclose(per_fold, recall["fold5__per_fold_metrics"], rtol=0, atol=1e-9)
    mean = np.array([result[k] for k in FOLD_VECTOR] + [result["rsum"]])
    expected_mean = recall["fold5__mean_metrics"]
    np.testing.assert_allclose(
        mean, np.concatenate([expected_mean[:10], expected_mean[12:]]), rtol=0, atol=1e-9
    )


def test_whole_matrix_protocols(recall: dict[str, np.ndarray]) -> None:
    direct = retrieval_metrics(recall["sims"])
    for protocol in ("flickr30k_1k", "coco_5k"):
        result = evaluate_protocol(recall["sims"], protocol)
        assert result["protocol"] == protocol
        assert result["num_images"] == 20 and result["num_captions"] == 100
        assert {k: result[k] for k in METRIC_KEYS} == direct
    with pytest.raises(ValueError, match="5 equal folds"):
        evaluate_protocol(recall["sims"][:12, :60], "coco_1k")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(recall["sims"], "flickr8k")


def test_ground_truth_ties_follow_the_optimistic_rule(recall: dict[str, np.ndarray]) -> None:
    ranks = retrieval_ranks(recall["gt_ties__sims"])
    np.testing.assert_array_equal(ranks.i2t_ranks, recall["gt_ties__i2t_ranks_optimistic"])
    np.testing.assert_array_equal(ranks.t2i_ranks, recall["gt_ties__t2i_ranks_optimistic"])
    for direction in ("i2t", "t2i"):
        ours = getattr(ranks, f"{direction}_ranks")
        low = recall[f"gt_ties__{direction}_ranks_optimistic"]
        high = recall[f"gt_ties__{direction}_ranks_pessimistic"]
        official = recall[f"gt_ties__{direction}_ranks_official_this_machine"]
        assert np.all(low <= ours) and np.all(ours <= high)
        assert np.all(low <= official) and np.all(official <= high)
    metrics = retrieval_metrics(recall["gt_ties__sims"])
    np.testing.assert_allclose(
        [metrics[k] for k in FOLD_VECTOR[:5]], recall["gt_ties__i2t_metrics_optimistic"], rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(
        [metrics[k] for k in FOLD_VECTOR[5:]], recall["gt_ties__t2i_metrics_optimistic"], rtol=0, atol=1e-9
    )


def _reference_ranks(scores: np.ndarray, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """The optimistic rule written out literally, one query at a time."""
    n = scores.shape[0]
    i2t = np.array(
        [np.sum(scores[i] > scores[i, i * per_image : (i + 1) * per_image].max()) for i in range(n)]
    )
    t2i = np.array([np.sum(scores[:, j] > scores[j // per_image, j]) for j in range(n * per_image)])
    return i2t, t2i


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("per_image", [1, 3, 5])
def test_blockwise_ranks_equal_the_literal_rule(
    monkeypatch: pytest.MonkeyPatch, per_image: int, backend: str
) -> None:
    rng = np.random.default_rng(per_image)
    scores = rng.integers(0, 6, size=(13, 13 * per_image)).astype(np.float32)  # many ties
    expected_i2t, expected_t2i = _reference_ranks(scores, per_image)

    def ranks() -> RetrievalRanks:
        if backend == "numpy":
            return retrieval_ranks(scores, per_image, top_k=4)
        # the accelerator path, run here on a CPU tensor
        return metrics_module._ranks_torch(torch.from_numpy(scores), per_image, 4)

    whole = ranks()
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 7)  # force tiny row/column blocks
    blocked = ranks()
    for result in (whole, blocked):
        np.testing.assert_array_equal(result.i2t_ranks, expected_i2t)
        np.testing.assert_array_equal(result.t2i_ranks, expected_t2i)
        np.testing.assert_array_equal(result.i2t_top1, scores.argmax(axis=1))
        np.testing.assert_array_equal(result.t2i_top1, scores.argmax(axis=0))
        assert result.i2t_topk is not None and result.t2i_topk is not None
        # top-k lists hold the k best scores in descending order
        best_rows = np.sort(scores, axis=1)[:, ::-1][:, :4]
        np.testing.assert_array_equal(np.take_along_axis(scores, result.i2t_topk, axis=1), best_rows)
        best_cols = np.sort(scores, axis=0)[::-1][:4].T
        np.testing.assert_array_equal(np.take_along_axis(scores.T, result.t2i_topk, axis=1), best_cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_give_the_same_ranks(recall: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    scores = torch.from_numpy(recall["sims"]).to(dtype)
    widened = scores.double().numpy()  # the same (rounded) values, compared in float64
    expected_i2t, expected_t2i = _reference_ranks(widened, 5)
    ranks = retrieval_ranks(scores)
    np.testing.assert_array_equal(ranks.i2t_ranks, expected_i2t)
    np.testing.assert_array_equal(ranks.t2i_ranks, expected_t2i)


def test_shape_and_nan_errors() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 5 \* N\)"):
        retrieval_ranks(np.zeros((4, 19)))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_ranks(np.zeros(20))
    scores = np.zeros((2, 10))
    scores[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(scores)


def test_ranks_table_and_writers(recall: dict[str, np.ndarray], tmp_path: Path) -> None:
    ranks = retrieval_ranks(recall["sims"], top_k=5)
    image_ids = [f"img{i}.jpg" for i in range(20)]
    captions = [f"caption {j}" for j in range(100)]
    table = ranks_table(ranks, image_ids=image_ids, captions=captions)
    path = write_ranks_parquet(tmp_path / "ranks.parquet", table)
    back = pq.read_table(path).to_pylist()
    assert len(back) == 120
    image_rows = [row for row in back if row["query_type"] == "i2t"]
    caption_rows = [row for row in back if row["query_type"] == "t2i"]
    assert [row["rank"] for row in image_rows] == recall["i2t_ranks"].astype(int).tolist()
    assert [row["top1"] for row in caption_rows] == recall["t2i_top1"].astype(int).tolist()
    assert caption_rows[42]["image_id"] == "img8.jpg" and caption_rows[42]["caption"] == "caption 42"
    assert image_rows[3]["caption"] is None and image_rows[3]["image_id"] == "img3.jpg"
    for row in back:
        assert len(row["topk"]) == 5 and row["topk"][0] == row["top1"]
    metrics = evaluate_protocol(recall["sims"], "coco_1k")
    metrics_path = write_metrics_json(tmp_path / "metrics.json", metrics)
    assert json.loads(metrics_path.read_text())["rsum"] == metrics["rsum"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "ranks.parquet"]
    with pytest.raises(ValueError, match="image ids"):
        ranks_table(ranks, image_ids=image_ids[:3])
