"""Conformance of the cross-attention scoring and the loss with the official SCAN numbers, plus masking,
blocking and precision properties of the fast implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.losses import hardest_negative_triplet_loss
from pipeline.models.xattn import xattn_relevance, xattn_scores

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _load(folder: Path) -> dict:
    inputs = np.load(folder / "inputs.npz")
    return {
        "img": torch.from_numpy(inputs["img_emb"]),
        "cap": torch.from_numpy(inputs["cap_emb"]),
        "lens": torch.from_numpy(inputs["cap_lens"]),
        "expected": np.load(folder / "expected.npz"),
        "intermediates": np.load(folder / "intermediates.npz"),
        "manifest": json.loads((folder / "manifest.json").read_text()),
    }


@pytest.fixture(scope="module")
def fx(scan_fixtures: Path) -> dict:
    return _load(scan_fixtures)


def _options(entry: dict) -> dict:
    return {
        "direction": entry["direction"],
        "raw_feature_norm": entry["raw_feature_norm"],
        "agg": entry["agg_func"],
        "lambda_softmax": entry["lambda_softmax"],
        "lambda_lse": entry["lambda_lse"] if entry["lambda_lse"] is not None else 1.0,
    }


def _similarity_keys(folder: Path) -> list[str]:
    manifest = folder / "manifest.json"
    return sorted(json.loads(manifest.read_text())["similarity"]) if manifest.is_file() else []


def test_manifest_covers_every_expected_key(fx: dict) -> None:
    keys = set(fx["manifest"]["similarity"])
    assert len(keys) == 58
    assert keys <= set(fx["expected"].files)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_similarity_matches_official(fx: dict, dtype: torch.dtype) -> None:
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    failures = []
    for key, entry in sorted(fx["manifest"]["similarity"].items()):
        scores = xattn_scores(fx["img"].to(dtype), fx["cap"].to(dtype), fx["lens"], **_options(entry))
        expected = fx["expected"][key]
        assert scores.dtype == dtype and scores.shape == expected.shape, key
        actual = scores.double().numpy()
        if not np.allclose(actual, expected, rtol=rtol, atol=atol):
            failures.append(f"{key}: max abs diff {np.abs(actual - expected).max():.3e}")
    assert not failures, "\n".join(failures)


def test_losses_match_official(fx: dict) -> None:
    assert len(fx["manifest"]["loss"]) == 8
    for key, entry in sorted(fx["manifest"]["loss"].items()):
        stored_scores = fx["expected"][entry["scores_key"]]
        n_pairs = entry["n_pairs"]
        # The score matrix itself, from our scoring of the first n_pairs images and captions.
        ours = xattn_scores(
            fx["img"][:n_pairs], fx["cap"][:n_pairs], fx["lens"][:n_pairs], **_options(entry["similarity"])
        )
        np.testing.assert_allclose(
            ours.numpy(), stored_scores, rtol=1e-9, atol=1e-12, err_msg=entry["scores_key"]
        )
        for scores in (torch.from_numpy(stored_scores), ours):
            loss = hardest_negative_triplet_loss(
                scores, margin=entry["margin"], max_violation=entry["max_violation"]
            )
            assert loss.shape == ()
            np.testing.assert_allclose(
                float(loss), float(fx["expected"][key]), rtol=1e-9, atol=1e-12, err_msg=key
            )


def test_intermediates_match_official(fx: dict) -> None:
    keys = fx["intermediates"].files
    assert len(keys) == 20
    for key in keys:
        direction, norm, lambda_key, what = key.split("__")
        result = xattn_relevance(
            fx["img"],
            fx["cap"],
            fx["lens"],
            direction=direction,
            raw_feature_norm=norm,
            lambda_softmax=float(lambda_key[2:]),
        )
        actual = getattr(result, what).numpy()
        expected = fx["intermediates"][key]
        assert actual.shape == expected.shape, key
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{key}: NaN layout")
        np.testing.assert_allclose(
            np.nan_to_num(actual), np.nan_to_num(expected), rtol=1e-9, atol=1e-12, err_msg=key
        )


def test_mean_of_relevance_is_mean_score(fx: dict) -> None:
    for direction, lambda_softmax in (("t2i", 9.0), ("i2t", 4.0)):
        relevance = xattn_relevance(
            fx["img"],
            fx["cap"],
            fx["lens"],
            direction=direction,
            raw_feature_norm="clipped_l2norm",
            lambda_softmax=lambda_softmax,
        ).relevance
        scores = xattn_scores(
            fx["img"],
            fx["cap"],
            fx["lens"],
            direction=direction,
            raw_feature_norm="clipped_l2norm",
            agg="Mean",
            lambda_softmax=lambda_softmax,
            lambda_lse=1.0,
        )
        np.testing.assert_allclose(np.nanmean(relevance.numpy(), axis=-1), scores.numpy(), rtol=1e-12)


def test_l1_norm_extensions_are_finite_and_masked(fx: dict) -> None:
    unsupported = fx["manifest"]["unsupported_in_official"]
    assert {entry["raw_feature_norm"] for entry in unsupported.values()} == {"l1norm", "clipped_l1norm"}
    garbage = fx["cap"].clone()
    for row, length in enumerate(fx["lens"].tolist()):
        garbage[row, length:] = -1e3 * torch.arange(garbage.shape[1] - length, dtype=garbage.dtype)[:, None]
    for key, entry in sorted(unsupported.items()):
        options = _options(entry)
        scores = xattn_scores(fx["img"], fx["cap"], fx["lens"], **options)
        assert scores.shape == (6, 10) and torch.isfinite(scores).all(), key
        # padding with other garbage gives the same rows: padding is masked
        torch.testing.assert_close(
            scores, xattn_scores(fx["img"], garbage, fx["lens"], **options), rtol=0, atol=1e-12
        )
        # every caption scored independently: truncating the padded width to its own length changes nothing
        for caption in (1, 7):
            length = int(fx["lens"][caption])
            alone = xattn_scores(
                fx["img"],
                fx["cap"][caption : caption + 1, :length],
                fx["lens"][caption : caption + 1],
                **options,
            )
            torch.testing.assert_close(alone[:, 0], scores[:, caption], rtol=1e-12, atol=1e-12)


def _default_options(
    direction: str, agg: str = "LogSumExp", norm: str = "clipped_l2norm", lse: float = 6.0
) -> dict:
    return {
        "direction": direction,
        "raw_feature_norm": norm,
        "agg": agg,
        "lambda_softmax": 9.0 if direction == "t2i" else 4.0,
        "lambda_lse": lse,
    }


ALL_NORMS = ["softmax", "clipped_l2norm", "l2norm", "clipped", "no_norm", "l1norm", "clipped_l1norm"]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", ALL_NORMS)
def test_padding_values_never_matter(fx: dict, direction: str, norm: str) -> None:
    noisy = fx["cap"].clone()
    generator = torch.Generator().manual_seed(1)
    for row, length in enumerate(fx["lens"].tolist()):
        noisy[row, length:] = (
            torch.randn(noisy.shape[1] - length, noisy.shape[2], generator=generator, dtype=noisy.dtype) * 50
        )
    noisy[3, 8] = float("nan")  # caption 3 has 7 words: row 8 is padding
    for agg in ("LogSumExp", "Mean", "Max", "Sum"):
        options = _default_options(direction, agg, norm)
        torch.testing.assert_close(
            xattn_scores(fx["img"], noisy, fx["lens"], **options),
            xattn_scores(fx["img"], fx["cap"], fx["lens"], **options),
            rtol=0,
            atol=1e-13,
        )


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("agg", ["LogSumExp", "Mean", "Max", "Sum"])
def test_padded_regions_are_masked(fx: dict, direction: str, agg: str) -> None:
    """Images with fewer regions (adaptive boxes) padded with garbage score as the unpadded images."""
    generator = torch.Generator().manual_seed(2)
    region_counts = [7, 3, 5, 1, 6, 2]
    padded = torch.randn(6, 7, 16, generator=generator, dtype=torch.float64) * 10  # garbage everywhere
    options = _default_options(direction, agg)
    for image, count in enumerate(region_counts):
        padded[image, :count] = fx["img"][image, :count]
    masked = xattn_scores(
        padded, fx["cap"], fx["lens"], region_lengths=torch.tensor(region_counts), **options
    )
    for image, count in enumerate(region_counts):
        alone = xattn_scores(fx["img"][image : image + 1, :count], fx["cap"], fx["lens"], **options)
        torch.testing.assert_close(masked[image : image + 1], alone, rtol=1e-12, atol=1e-12)


def test_padded_regions_intermediates_are_nan(fx: dict) -> None:
    result = xattn_relevance(
        fx["img"],
        fx["cap"],
        fx["lens"],
        direction="i2t",
        raw_feature_norm="clipped_l2norm",
        lambda_softmax=4.0,
        region_lengths=torch.tensor([7, 3, 7, 7, 7, 7]),
    )
    assert torch.isnan(result.relevance[1, :, 3:]).all() and torch.isfinite(result.relevance[1, :, :3]).all()
    attention_sums = torch.nansum(result.attention[0], dim=-1)
    torch.testing.assert_close(attention_sums, torch.ones_like(attention_sums))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_block_size_does_not_change_results(fx: dict, direction: str) -> None:
    options = _default_options(direction, "LogSumExp", "clipped_l2norm")
    reference = xattn_scores(fx["img"], fx["cap"], fx["lens"], block_size=100, **options)
    for block in (1, 2, 3, (4, 1), (1, 7), (5, 3)):
        torch.testing.assert_close(
            xattn_scores(fx["img"], fx["cap"], fx["lens"], block_size=block, **options),
            reference,
            rtol=1e-13,
            atol=1e-14,
        )


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_single_image_and_one_word_caption(fx: dict, direction: str) -> None:
    full = xattn_scores(fx["img"], fx["cap"], fx["lens"], **_default_options(direction, "Mean"))
    one_image = xattn_scores(fx["img"][2:3], fx["cap"], fx["lens"], **_default_options(direction, "Mean"))
    assert one_image.shape == (1, 10)
    torch.testing.assert_close(one_image[0], full[2], rtol=1e-12, atol=1e-12)
    # caption 7 has one word: a (n_img, 1) column, equal to scoring it alone, unpadded
    one_word = xattn_scores(
        fx["img"], fx["cap"][7:8, :1], torch.tensor([1]), **_default_options(direction, "Mean")
    )
    assert one_word.shape == (6, 1)
    torch.testing.assert_close(one_word[:, 0], full[:, 7], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lse20_stays_finite_and_close(fx: dict, direction: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(12, 36, 64, generator=generator), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(20, 12, 64, generator=generator), dim=-1)
    lengths = torch.randint(1, 13, (20,), generator=generator)
    options = _default_options(direction, "LogSumExp", lse=20.0)
    reference = xattn_scores(images, captions, lengths, **options)
    half = xattn_scores(images.to(dtype), captions.to(dtype), lengths, **options)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (half - reference).abs().max().item() < tolerance


def test_unknown_options_are_rejected_by_name(fx: dict) -> None:
    base = _default_options("t2i")
    for option, value in (("direction", "both"), ("raw_feature_norm", "l3norm"), ("agg", "Median")):
        with pytest.raises(ValueError, match=rf"{option}=.*{value}.*allowed values"):
            xattn_scores(fx["img"], fx["cap"], fx["lens"], **{**base, option: value})
    with pytest.raises(ValueError, match="caption_lengths"):
        xattn_scores(fx["img"], fx["cap"], torch.tensor([0] * 10), **base)
    with pytest.raises(ValueError, match="caption_lengths"):
        xattn_scores(fx["img"], fx["cap"], torch.tensor([10] * 10), **base)
    with pytest.raises(ValueError, match="region_lengths"):
        xattn_scores(fx["img"], fx["cap"], fx["lens"], region_lengths=torch.tensor([8] * 6), **base)
    with pytest.raises(ValueError, match="embedding size"):
        xattn_scores(fx["img"][:, :, :8], fx["cap"], fx["lens"], **base)
    with pytest.raises(ValueError, match="lambda_softmax"):
        xattn_scores(fx["img"], fx["cap"], fx["lens"], **{**base, "lambda_softmax": 0.0})


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_autocast_runs_only_the_product_in_half_precision(direction: str) -> None:
    generator = torch.Generator().manual_seed(5)
    images = torch.nn.functional.normalize(torch.randn(6, 36, 64, generator=generator), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(9, 12, 64, generator=generator), dim=-1)
    lengths = torch.randint(1, 13, (9,), generator=generator)
    options = _default_options(direction, "LogSumExp", lse=20.0)
    reference = xattn_scores(images, captions, lengths, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = xattn_scores(images, captions, lengths, **options)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert (mixed - reference).abs().max().item() < 2e-2
