"""Conformance of MMCA (pipeline/models/mmca.py) with the float64 per-pair reference of shared/fixtures/mmca,
plus the properties the fixtures cannot show: padding and batch independence, two-stage rules, refusals.

Every expected number, size, alpha and k is read from the fixture files, so the hidden set runs unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.models.losses import hardest_negative_triplet_loss
from pipeline.models.mmca import (
    MMCA,
    MMCAConfig,
    load_reference_weights,
    reference_weight_shapes,
    shortlists,
)
from tests.conftest import SHARED_DIR, _require

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MMCA_FIXTURES = SHARED_DIR / "fixtures" / "mmca"
PAPER_DEFAULTS = {
    "img_dim": 2048,
    "bert_dim": 768,
    "embed_size": 256,
    "num_heads": 16,
    "cnn_filters": 256,
    "alpha": 0.2,
}


@pytest.fixture(scope="session")
def mmca_fixtures() -> Path:
    """Folder of the MMCA conformance fixtures (skips the test when it is absent)."""
    return _require(MMCA_FIXTURES)


@pytest.fixture(scope="module")
def fx(mmca_fixtures: Path) -> dict:
    with np.load(mmca_fixtures / "weights.npz") as weights:
        weight_arrays = dict(weights)
    return {
        "manifest": json.loads((mmca_fixtures / "manifest.json").read_text()),
        "weights": weight_arrays,
        "inputs": dict(np.load(mmca_fixtures / "inputs.npz")),
        "expected": dict(np.load(mmca_fixtures / "expected.npz")),
        "intermediates": dict(np.load(mmca_fixtures / "intermediates.npz")),
    }


def _model(fx: dict, dtype: torch.dtype = torch.float64) -> MMCA:
    """Cast first, then load: the float64 arrays are rounded once, to the parameters' dtype (README §3)."""
    model = MMCA(MMCAConfig(**fx["manifest"]["mmca_config"])).to(dtype).eval()
    load_reference_weights(model, fx["weights"])
    return model


def _args(fx: dict, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    inputs = fx["inputs"]
    return (
        torch.tensor(inputs["region_features"], dtype=dtype),
        torch.tensor(inputs["region_counts"]),
        torch.tensor(inputs["word_features"], dtype=dtype),
        torch.tensor(inputs["word_counts"]),
    )


def _tolerance(fx: dict, dtype: torch.dtype) -> tuple[float, float]:
    entry = fx["manifest"]["tolerances"]["float64" if dtype == torch.float64 else "float32"]
    return entry["rtol"], entry["atol"]


def _compare(
    key: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float
) -> tuple[float, float]:
    """Assert the fixture rule for one key; returns (largest |difference|, largest share of the allowance)."""
    assert actual.shape == expected.shape, f"{key}: shape {actual.shape}, expected {expected.shape}"
    if not np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_array_equal(actual, expected, err_msg=key)
        return 0.0, 0.0
    actual = actual.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{key}: NaN layout")
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{key}: -inf layout")
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{key}: +inf layout")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol, err_msg=key)
    if not finite.any():
        return 0.0, 0.0
    difference = np.abs(actual[finite] - expected[finite])
    return float(difference.max()), float((difference / (atol + rtol * np.abs(expected[finite]))).max())


def _report(title: str, deviations: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}: largest |actual - expected| and share of the allowance atol + rtol*|expected|")
    for key, (difference, share) in sorted(deviations.items()):
        print(f"  {key:42s} {difference:10.3e} {share:8.2%}")


def _computed_expected(fx: dict, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Every key of expected.npz, computed through the public interface."""
    manifest, expected = fx["manifest"], fx["expected"]
    model = _model(fx, dtype)
    regions, region_counts, words, word_counts = args = _args(fx, dtype)
    n_img, n_cap = regions.shape[0], words.shape[0]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        images = model.encode_images(regions, region_counts)
        captions = model.encode_captions(words, word_counts)
        grid_images = torch.arange(n_img).repeat_interleave(n_cap)
        grid_captions = torch.arange(n_cap).repeat(n_img)
        i1, c1 = model.cross_embeddings(images, captions, grid_images, grid_captions)
        out["i0"], out["c0"] = images.embedding, captions.embedding
        out["i1"], out["c1"] = i1.view(n_img, n_cap, -1), c1.view(n_img, n_cap, -1)
        out["self_scores"] = model.self_scores(images, captions)
        out["cross_scores"] = (out["i1"] * out["c1"]).sum(dim=-1)
        out["scores"] = model.score_matrix(*args)
        batch = expected["loss_scores"].shape[0]  # the square in-batch case: image i with caption i
        out["loss_scores"] = model(regions[:batch], region_counts[:batch], words[:batch], word_counts[:batch])
        for key, case in manifest["loss"].items():
            out[key] = hardest_negative_triplet_loss(
                out[case["scores_key"]], margin=case["margin"], max_violation=case["max_violation"]
            )
        two_stage = manifest["two_stage"]
        i2t_key, t2i_key = two_stage["keys"]
        out[i2t_key], out[t2i_key] = model.two_stage_scores(*args, k=two_stage["k"])
        out[f"{i2t_key}_shortlist"], out[f"{t2i_key}_shortlist"] = shortlists(
            out["self_scores"], two_stage["k"]
        )
    for key in ("scores", "loss_scores", i2t_key, t2i_key):
        assert out[key].dtype == dtype, key
    return {key: value.numpy() for key, value in out.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_expected_key_matches_the_reference(fx: dict, dtype: torch.dtype) -> None:
    rtol, atol = _tolerance(fx, dtype)
    computed = _computed_expected(fx, dtype)
    assert set(computed) == set(fx["expected"]), "every key of expected.npz is checked"
    deviations = {key: _compare(key, computed[key], fx["expected"][key], rtol, atol) for key in computed}
    _report(f"expected.npz, {dtype}", deviations)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_intermediate_matches_the_reference(fx: dict, dtype: torch.dtype) -> None:
    rtol, atol = _tolerance(fx, dtype)
    with torch.no_grad():
        computed = _model(fx, dtype).intermediates(*_args(fx, dtype), pairs=fx["manifest"]["debug_pairs"])
    assert set(computed) == set(fx["intermediates"]), "every key of intermediates.npz is checked"
    deviations = {
        key: _compare(key, computed[key].numpy(), fx["intermediates"][key], rtol, atol) for key in computed
    }
    _report(f"intermediates.npz, {dtype}", deviations)


def test_manifest_weights_and_config(fx: dict) -> None:
    manifest = fx["manifest"]
    assert set(manifest["mmca_config"]) == set(MMCAConfig.model_fields) == set(PAPER_DEFAULTS)
    shapes = reference_weight_shapes(_model(fx))
    assert len(shapes) == 44
    assert shapes == {name: tuple(shape) for name, shape in manifest["weights"].items()}
    assert {name: array.shape for name, array in fx["weights"].items()} == shapes


def test_inputs_are_never_modified(fx: dict) -> None:
    model = _model(fx)
    args = _args(fx)
    copies = [arg.clone() for arg in args]
    with torch.no_grad():
        model.score_matrix(*args)
        model.two_stage_scores(*args, k=fx["manifest"]["two_stage"]["k"])
    for arg, copy in zip(args, copies, strict=True):
        assert torch.equal(arg, copy)


def _fill_padding(regions, region_counts, words, word_counts, value: float):
    regions, words = regions.clone(), words.clone()
    for row, count in enumerate(region_counts.tolist()):
        regions[row, count:] = value
    for row, count in enumerate(word_counts.tolist()):
        words[row, count:] = value
    return regions, region_counts, words, word_counts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_values_and_padded_sizes_never_matter(fx: dict, dtype: torch.dtype) -> None:
    model = _model(fx, dtype)
    args = _args(fx, dtype)
    k = fx["manifest"]["two_stage"]["k"]
    with torch.no_grad():
        reference = model.score_matrix(*args)
        reference_two_stage = model.two_stage_scores(*args, k=k)
        big = torch.finfo(dtype).max / 4
        for value in (float("nan"), big, -big, float("inf"), 0.0):
            filled = _fill_padding(*args, value)
            assert torch.equal(model.score_matrix(*filled), reference), value
            for ours, theirs in zip(model.two_stage_scores(*filled, k=k), reference_two_stage, strict=True):
                assert torch.equal(ours, theirs), value
        # Larger padded sizes, filled with NaN: the same scores (to rounding; the blocks are trimmed anyway).
        regions, region_counts, words, word_counts = args
        wider_regions = torch.cat([regions, torch.full_like(regions[:, :3], float("nan"))], dim=1)
        wider_words = torch.cat([words, torch.full_like(words[:, :4], float("nan"))], dim=1)
        wider = model.score_matrix(wider_regions, region_counts, wider_words, word_counts)
    # different GEMM shapes in the per-item encoders: rounding only
    rtol, atol = (1e-13, 1e-14) if dtype == torch.float64 else _tolerance(fx, dtype)
    torch.testing.assert_close(wider, reference, rtol=rtol, atol=atol)


def test_a_pair_depends_only_on_its_image_and_caption(fx: dict) -> None:
    model = _model(fx)
    regions, region_counts, words, word_counts = args = _args(fx)
    with torch.no_grad():
        reference = model.score_matrix(*args)
        # every block size, from one pair per block to everything in one block
        for block in (1, 2, (1, 3), (4, 1), (5, 7), 1000):
            torch.testing.assert_close(
                model.score_matrix(*args, block_size=block), reference, rtol=1e-12, atol=0
            )
        # other companions and another order: permuted subsets score the same pairs the same
        generator = torch.Generator().manual_seed(0)
        images = torch.randperm(regions.shape[0], generator=generator)[: max(1, regions.shape[0] // 2)]
        captions = torch.randperm(words.shape[0], generator=generator)[: max(1, words.shape[0] // 2)]
        subset = model.score_matrix(
            regions[images], region_counts[images], words[captions], word_counts[captions]
        )
        torch.testing.assert_close(subset, reference[images][:, captions], rtol=1e-12, atol=0)
        # each pair alone, sliced to its valid rows (no padding, no other item)
        for image in range(regions.shape[0]):
            for caption in range(words.shape[0]):
                k, n = int(region_counts[image]), int(word_counts[caption])
                alone = model.score_matrix(
                    regions[image : image + 1, :k],
                    region_counts[image : image + 1],
                    words[caption : caption + 1, :n],
                    word_counts[caption : caption + 1],
                )
                torch.testing.assert_close(alone[0, 0], reference[image, caption], rtol=1e-12, atol=0)


def test_progress_reports_every_pair_and_block_size_is_checked(fx: dict) -> None:
    model = _model(fx)
    args = _args(fx)
    n_pairs = args[0].shape[0] * args[2].shape[0]
    calls: list[int] = []
    with torch.no_grad():
        model.score_matrix(*args, block_size=(2, 3), progress=calls.append)
    n_blocks = math.ceil(args[0].shape[0] / 2) * math.ceil(args[2].shape[0] / 3)
    assert sum(calls) == n_pairs and len(calls) == n_blocks
    for bad in (0, (2, 0), (1, 2, 3), 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            model.score_matrix(*args, block_size=bad)


def test_two_stage_rules(fx: dict) -> None:
    model = _model(fx)
    args = _args(fx)
    n_img, n_cap = args[0].shape[0], args[2].shape[0]
    with torch.no_grad():
        scores = model.score_matrix(*args)
        for k in (1, 2, fx["manifest"]["two_stage"]["k"]):
            calls: list[int] = []
            i2t, t2i = model.two_stage_scores(*args, k=k, block_size=(1, 2), progress=calls.append)
            kept_i2t, kept_t2i = torch.isfinite(i2t), torch.isfinite(t2i)
            assert (kept_i2t.sum(dim=1) == min(k, n_cap)).all() and (
                kept_t2i.sum(dim=0) == min(k, n_img)
            ).all()
            assert torch.isneginf(i2t[~kept_i2t]).all() and torch.isneginf(t2i[~kept_t2i]).all()
            assert sum(calls) == int((kept_i2t | kept_t2i).sum())  # a pair shortlisted both ways: once
            torch.testing.assert_close(i2t[kept_i2t], scores[kept_i2t], rtol=1e-12, atol=0)
            torch.testing.assert_close(t2i[kept_t2i], scores[kept_t2i], rtol=1e-12, atol=0)
        # k at least the number of candidates: everything is shortlisted, both matrices are the exact scores
        for matrix in model.two_stage_scores(*args, k=max(n_img, n_cap) + 5):
            torch.testing.assert_close(matrix, scores, rtol=1e-12, atol=0)
    # equal first-stage scores: the lower index first
    by_image, by_caption = shortlists(torch.tensor([[0.5, 0.7, 0.5, 0.7], [0.1, 0.1, 0.1, 0.1]]), 3)
    assert by_image.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert by_caption.tolist() == [[0, 1], [0, 1], [0, 1], [0, 1]]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            model.two_stage_scores(*args, k=bad)


def test_config_defaults_and_refusals() -> None:
    assert MMCAConfig().model_dump() == PAPER_DEFAULTS
    config = MMCAConfig(embed_size=16, num_heads=4)
    with pytest.raises(ValidationError):
        config.alpha = 0.5  # frozen
    refusals = [
        ({"embed_size": 16, "num_heads": 5}, "num_heads=5 must divide embed_size=16"),
        ({"embed_size": 0}, "embed_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"img_dim": -3}, "img_dim"),
        ({"bert_dim": 0}, "bert_dim"),
        ({"cnn_filters": 0}, "cnn_filters"),
        ({"cnn_filters": True}, "cnn_filters must be a number"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 0.1}, "dropout"),
    ]
    for options, message in refusals:
        with pytest.raises(ValueError, match=message) as caught:
            MMCAConfig(**options)
        assert len(caught.value.errors()) == 1 and "\n" not in caught.value.errors()[0]["msg"], options


def test_parameter_counts_at_the_paper_settings() -> None:
    """mmca.md §2.8: 3,479,040 trainable parameters at G=2048, D=768, d=256, h=16, F=256."""
    model = MMCA(MMCAConfig())
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert counts == {
        "image_fc": 524_544,
        "image_self": 394_752,
        "text_self": 1_377_280,
        "word_fc": 196_864,
        "cross": 394_752,
        "text_cross": 590_848,
    }
    assert sum(p.numel() for p in model.parameters()) == 3_479_040


def test_reference_weights_refused_by_name_and_never_half_loaded(fx: dict) -> None:
    model = MMCA(MMCAConfig(**fx["manifest"]["mmca_config"])).double()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    weights = fx["weights"]
    missing = {k: v for k, v in weights.items() if k != "cross.attention.key.weight"}
    with pytest.raises(ValueError, match=r"missing.*'cross\.attention\.key\.weight'"):
        load_reference_weights(model, missing)
    with pytest.raises(ValueError, match=r"unknown.*'image_fc\.weigth'"):
        load_reference_weights(model, {**weights, "image_fc.weigth": weights["image_fc.weight"]})
    transposed = {**weights, "image_fc.weight": weights["image_fc.weight"].T}
    with pytest.raises(ValueError, match=r"'image_fc\.weight' has shape"):
        load_reference_weights(model, transposed)
    conv = weights["text_cross.conv2.weight"]
    with pytest.raises(ValueError, match=r"'text_cross\.conv2\.weight' has shape"):
        load_reference_weights(model, {**weights, "text_cross.conv2.weight": conv[:, :, :1]})
    with pytest.raises(ValueError, match=r"'cross\.norm2\.bias' must hold finite"):
        load_reference_weights(
            model, {**weights, "cross.norm2.bias": np.full_like(weights["cross.norm2.bias"], np.nan)}
        )
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a refused load"
    # torch tensors load as numpy arrays do, and a float32 model gets each array rounded once
    as_tensors = {name: torch.from_numpy(array) for name, array in weights.items()}
    load_reference_weights(model, as_tensors)
    args = _args(fx)
    with torch.no_grad():
        torch.testing.assert_close(model.score_matrix(*args), _model(fx).score_matrix(*args), rtol=0, atol=0)
    single = _model(fx, torch.float32)
    assert torch.equal(single.image_fc.weight, torch.from_numpy(weights["image_fc.weight"]).float())


def test_input_checks_name_the_argument(fx: dict) -> None:
    model = _model(fx)
    regions, region_counts, words, word_counts = _args(fx)
    max_regions, max_words = regions.shape[1], words.shape[1]
    cases = [
        ((regions, region_counts.clone().fill_(0), words, word_counts), "region_lengths"),
        ((regions, region_counts.clone().fill_(max_regions + 1), words, word_counts), "region_lengths"),
        ((regions, region_counts, words, word_counts.clone().fill_(max_words + 1)), "word_lengths"),
        ((regions, region_counts.double(), words, word_counts), "region_lengths must hold integers"),
        ((regions, region_counts[:-1], words, word_counts), "region_lengths must have shape"),
        ((regions[:, :, :-1], region_counts, words, word_counts), "region_features"),
        ((regions, region_counts, words[:, :, :-1], word_counts), "word_features"),
        ((regions.float(), region_counts, words, word_counts), "region_features are torch.float32"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model.score_matrix(*args)


# ---- an independent per-pair definition (mmca.md §2 read literally), on random weights and sizes -----------
def _random_reference_weights(model: MMCA, generator: np.random.Generator) -> dict[str, np.ndarray]:
    """As the fixtures' README §6 draws them: gains U(0.8, 1.2), biases N(0, 0.01), N(0, 1) / sqrt(fan_in)."""
    weights = {}
    for name, shape in reference_weight_shapes(model).items():
        if ".norm" in name and name.endswith(".weight"):
            weights[name] = generator.uniform(0.8, 1.2, shape)
        elif name.endswith(".bias"):
            weights[name] = generator.normal(0.0, 0.1, shape)
        else:
            weights[name] = generator.normal(0.0, 1.0, shape) / math.sqrt(math.prod(shape[1:]))
    return weights


def _layer_norm(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _unit(x: torch.Tensor, w: dict, unit: str, heads: int) -> torch.Tensor:
    q, k, v = (x @ w[f"{unit}.attention.{part}.weight"].T for part in ("query", "key", "value"))
    d_k = x.shape[1] // heads
    outputs = []
    for head in range(heads):
        columns = slice(head * d_k, (head + 1) * d_k)
        attention = torch.softmax(q[:, columns] @ k[:, columns].T / math.sqrt(d_k), dim=-1)
        outputs.append(attention @ v[:, columns])
    x1 = _layer_norm(
        x + torch.cat(outputs, dim=1) @ w[f"{unit}.attention.output.weight"].T, w, f"{unit}.norm1"
    )
    hidden = torch.relu(x1 @ w[f"{unit}.ffn.fc1.weight"].T + w[f"{unit}.ffn.fc1.bias"])
    return _layer_norm(
        x1 + hidden @ w[f"{unit}.ffn.fc2.weight"].T + w[f"{unit}.ffn.fc2.bias"], w, f"{unit}.norm2"
    )


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.sqrt((x**2).sum()) + 1e-8)


def _cnn(z: torch.Tensor, w: dict, head: str) -> torch.Tensor:
    n, pooled = z.shape[0], []
    for window in (1, 2, 3):
        conv, bias = w[f"{head}.conv{window}.weight"], w[f"{head}.conv{window}.bias"]
        extended = torch.cat([z, z.new_zeros(window - 1, z.shape[1])])
        positions = [
            torch.relu(bias + sum(conv[:, :, t] @ extended[k + t] for t in range(window))) for k in range(n)
        ]
        pooled.append(torch.stack(positions).max(dim=0).values)
    return _l2(torch.cat(pooled) @ w[f"{head}.fc.weight"].T + w[f"{head}.fc.bias"])


def _pair_score(o: torch.Tensor, e: torch.Tensor, w: dict, heads: int, alpha: float) -> torch.Tensor:
    """S(i, c) from the valid rows only: O (k, G) and E (n, D)."""
    r = o @ w["image_fc.weight"].T + w["image_fc.bias"]
    i0 = _l2(_unit(r, w, "image_self", heads).mean(dim=0))
    c0 = _cnn(e, w, "text_self")
    y = _unit(torch.cat([r, e @ w["word_fc.weight"].T + w["word_fc.bias"]]), w, "cross", heads)
    i1, c1 = _l2(y[: o.shape[0]].mean(dim=0)), _cnn(y[o.shape[0] :], w, "text_cross")
    return i0 @ c0 + alpha * (i1 @ c1)


def test_adaptive_region_counts_match_a_per_pair_loop() -> None:
    """Adaptive 10-100 regions, sizes, heads and alpha unlike the fixtures; garbage in every padded row."""
    config = MMCAConfig(img_dim=6, bert_dim=5, embed_size=8, num_heads=2, cnn_filters=3, alpha=0.7)
    model = MMCA(config).double().eval()
    generator = np.random.default_rng(7)
    weights = _random_reference_weights(model, generator)
    load_reference_weights(model, weights)
    region_counts, word_counts = [10, 100, 37, 64], [3, 1, 17, 2, 9]
    regions = torch.from_numpy(np.abs(generator.normal(size=(4, 100, 6))))
    words = torch.from_numpy(generator.normal(size=(5, 17, 5)))
    regions, _, words, _ = _fill_padding(
        regions, torch.tensor(region_counts), words, torch.tensor(word_counts), 1e6
    )
    with torch.no_grad():
        scores = model.score_matrix(regions, torch.tensor(region_counts), words, torch.tensor(word_counts))
    w = {name: torch.from_numpy(array) for name, array in weights.items()}
    expected = torch.tensor(
        [
            [float(_pair_score(regions[i, :k], words[c, :n], w, 2, 0.7)) for c, n in enumerate(word_counts)]
            for i, k in enumerate(region_counts)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_training_forward_has_gradients_everywhere() -> None:
    torch.manual_seed(0)
    model = MMCA(MMCAConfig(img_dim=6, bert_dim=5, embed_size=8, num_heads=2, cnn_filters=3)).double()
    regions = torch.rand(4, 7, 6, dtype=torch.float64)
    words = torch.randn(4, 6, 5, dtype=torch.float64)
    region_counts, word_counts = torch.tensor([7, 3, 5, 1]), torch.tensor([6, 2, 1, 4])
    regions, _, words, _ = _fill_padding(regions, region_counts, words, word_counts, float("nan"))
    scores = model(regions, region_counts, words, word_counts)
    assert scores.shape == (4, 4) and scores.requires_grad
    hardest_negative_triplet_loss(scores).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    with torch.no_grad():
        torch.testing.assert_close(model(regions, region_counts, words, word_counts), scores.detach())
    # gradients with respect to the valid inputs agree with finite differences
    valid_regions = regions[:2, :3].clone().requires_grad_(True)
    valid_words = words[:2, :2].clone().requires_grad_(True)
    lengths = (torch.tensor([3, 3]), torch.tensor([2, 2]))
    assert torch.autograd.gradcheck(
        lambda r, e: model.score_matrix(r, lengths[0], e, lengths[1]), (valid_regions, valid_words)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite_and_close(fx: dict, dtype: torch.dtype) -> None:
    with torch.no_grad():
        reference = _model(fx).score_matrix(*_args(fx))
        half = _model(fx, dtype).score_matrix(*_args(fx, dtype))
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.double() - reference).abs().max() < (5e-2 if dtype == torch.bfloat16 else 1e-2)
