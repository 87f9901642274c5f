"""Encoders, SCAN model, registry, loss and ensembles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.evaluation import encode_and_score, ensemble_scores
from pipeline.models.build import create_model
from pipeline.models.config import ScanConfig
from pipeline.models.encoders import ImageEncoder, TextEncoder, l2norm
from pipeline.models.ensemble import average_scores
from pipeline.models.losses import hardest_negative_triplet_loss
from pipeline.models.registry import list_models, model_config, model_family, model_text_input
from pipeline.models.scan import SCAN
from pipeline.models.xattn import xattn_scores

pytestmark = pytest.mark.usefixtures("single_torch_thread")


SMALL = {"vocab_size": 30, "img_dim": 20, "embed_size": 16, "word_dim": 8}


def _batch(seed: int = 0, batch: int = 5, regions: int = 6, words: int = 7, img_dim: int = 20):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, regions, img_dim, generator=generator)
    token_ids = torch.randint(4, 30, (batch, words), generator=generator)
    lengths = torch.tensor([words, 3, 1, 5, 2][:batch])
    for row, length in enumerate(lengths.tolist()):
        token_ids[row, length:] = 0
    return features, token_ids, lengths


def test_l2norm_adds_epsilon_to_the_norm() -> None:
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(l2norm(x), x / (5.0 + 1e-8))
    assert torch.equal(l2norm(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_image_encoder_init_norm_and_region_masking() -> None:
    encoder = ImageEncoder(20, 16)
    bound = math.sqrt(6.0) / math.sqrt(36)
    assert encoder.fc.weight.abs().max() <= bound and encoder.fc.weight.abs().max() > 0.8 * bound
    assert torch.equal(encoder.fc.bias, torch.zeros(16))
    features = torch.randn(3, 4, 20)
    out = encoder(features, torch.tensor([4, 2, 1]))
    norms = out.norm(dim=-1)
    torch.testing.assert_close(norms[0], torch.ones(4), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1, 2:], torch.zeros(2, 16)) and torch.equal(out[2, 1:], torch.zeros(3, 16))
    raw = ImageEncoder(20, 16, no_imgnorm=True)
    raw.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(raw(features), encoder.fc(features))
    with pytest.raises(ValueError, match="region_features"):
        encoder(torch.randn(3, 4, 19))


def test_text_encoder_masks_padding_and_averages_directions() -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(30, 8, 16, bidirectional=True)
    assert encoder.embed.weight.abs().max() <= 0.1
    _, token_ids, lengths = _batch()
    out = encoder(token_ids, lengths)
    assert out.shape == (5, 7, 16)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :length].norm(dim=-1), torch.ones(length), rtol=1e-5, atol=1e-5)
        assert torch.equal(out[row, length:], torch.zeros(7 - length, 16))
    # padding tokens never matter: other ids beyond the length give the same output
    changed = token_ids.clone()
    changed[1, 3:] = 17
    torch.testing.assert_close(encoder(changed, lengths), out)
    # the bidirectional output is the mean of the two directions, each computed on the unpadded caption
    encoder.no_txtnorm = True
    caption = token_ids[3:4, :5]
    full, _ = encoder.rnn(encoder.embed(caption))
    torch.testing.assert_close(encoder(token_ids, lengths)[3, :5], (full[0, :, :16] + full[0, :, 16:]) / 2)


def test_text_encoder_unidirectional_and_layers() -> None:
    encoder = TextEncoder(30, 8, 16, num_layers=2, bidirectional=False)
    assert encoder.rnn.num_layers == 2 and not encoder.rnn.bidirectional
    _, token_ids, lengths = _batch()
    assert encoder(token_ids, lengths).shape == (5, 7, 16)
    with pytest.raises(ValueError, match="caption_lengths"):
        encoder(token_ids, torch.tensor([8, 1, 1, 1, 1]))


def test_registry_names_defaults_and_overrides() -> None:
    assert {"scan_t2i_lse", "scan_t2i_avg", "scan_i2t_lse", "scan_i2t_avg"} <= set(list_models())
    expected = {
        "scan_t2i_lse": ("t2i", "LogSumExp", 9.0, 6.0),
        "scan_t2i_avg": ("t2i", "Mean", 9.0, None),
        "scan_i2t_lse": ("i2t", "LogSumExp", 4.0, 5.0),
        "scan_i2t_avg": ("i2t", "Mean", 4.0, None),
    }
    for name, (direction, agg, lambda_softmax, lambda_lse) in expected.items():
        config = model_config(name, vocab_size=10)
        assert (config.direction, config.agg, config.lambda_softmax) == (direction, agg, lambda_softmax)
        assert config.raw_feature_norm == "clipped_l2norm"
        if lambda_lse is not None:
            assert config.lambda_lse == lambda_lse
    coco = create_model("scan_i2t_lse", lambda_lse=20.0, **SMALL)
    assert isinstance(coco, SCAN) and coco.config.lambda_lse == 20.0
    rebuilt = create_model("scan_i2t_lse", **coco.config.model_dump())
    assert rebuilt.config == coco.config
    with pytest.raises(ValueError, match=r"unknown model 'scan_x'.*scan_t2i_avg"):
        create_model("scan_x", **SMALL)
    with pytest.raises(ValidationError, match="lamda_lse"):
        create_model("scan_t2i_lse", lamda_lse=3.0, **SMALL)
    with pytest.raises(ValidationError, match="raw_feature_norm"):
        ScanConfig(vocab_size=3, raw_feature_norm="l3norm")


@pytest.mark.parametrize("name", [name for name in list_models() if model_family(name) == "scan"])
def test_every_registered_model_forward_shapes_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **SMALL)
    features, token_ids, lengths = _batch()
    scores = model(features, None, token_ids, lengths)
    assert scores.shape == (5, 5) and torch.isfinite(scores).all()
    loss = hardest_negative_triplet_loss(scores)
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
    assert model.image_encoder.fc.weight.grad.abs().sum() > 0
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0
    # the differentiable path and the in-place inference path give the same scores
    with torch.no_grad():
        torch.testing.assert_close(model(features, None, token_ids, lengths), scores.detach())


def test_every_registered_model_builds_from_its_name() -> None:
    """SCAN variants above; MMCA (BERT rows in, tests/test_mmca_fixtures.py) built and run here."""
    torch.manual_seed(0)
    model = create_model("mmca", img_dim=8, bert_dim=6, embed_size=8, num_heads=2, cnn_filters=4)
    features, lengths = torch.randn(3, 4, 8), torch.tensor([4, 2, 3])
    words, word_lengths = torch.randn(3, 5, 6), torch.tensor([5, 3, 1])
    scores = model(features, lengths, words, word_lengths)
    assert scores.shape == (3, 3) and torch.isfinite(scores).all()
    assert model_text_input("mmca") == "bert" and model_family("mmca") == "mmca"
    assert {model_text_input(name) for name in list_models() if model_family(name) == "scan"} == {"words"}


@pytest.mark.parametrize(
    ("direction", "norm"),
    [("t2i", "clipped_l2norm"), ("i2t", "softmax"), ("t2i", "no_norm"), ("i2t", "clipped_l1norm")],
)
def test_xattn_gradient_matches_finite_differences(norm: str, direction: str) -> None:
    generator = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(
        torch.randn(2, 3, 4, generator=generator, dtype=torch.float64), dim=-1
    )
    captions = torch.nn.functional.normalize(
        torch.randn(2, 3, 4, generator=generator, dtype=torch.float64), dim=-1
    )
    images.requires_grad_(True)
    captions.requires_grad_(True)

    def score(img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        return xattn_scores(
            img,
            cap,
            torch.tensor([3, 2]),
            region_lengths=torch.tensor([3, 2]),
            direction=direction,
            raw_feature_norm=norm,
            agg="LogSumExp",
            lambda_softmax=4.0,
            lambda_lse=5.0,
        )

    assert torch.autograd.gradcheck(score, (images, captions), fast_mode=True)


def test_region_lengths_pass_through_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("scan_i2t_lse", **SMALL).eval()
    features, token_ids, lengths = _batch()
    region_lengths = torch.tensor([6, 2, 4, 1, 3])
    garbage = features.clone()
    for row, count in enumerate(region_lengths.tolist()):
        garbage[row, count:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(
            model(features, region_lengths, token_ids, lengths),
            model(garbage, region_lengths, token_ids, lengths),
        )


def test_triplet_loss_definition_and_properties() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.3, 0.0, 0.4]])
    margin = 0.2
    cost_s = [[0.0, 0.1, 0.0], [0.0, 0.0, 0.3], [0.1, 0.0, 0.0]]  # m + S[i,j] - S[i,i], hinge, diag 0
    cost_im = [[0.0, 0.5, 0.0], [0.0, 0.0, 0.4], [0.0, 0.0, 0.0]]  # m + S[i,j] - S[j,j]
    hardest = sum(max(row) for row in cost_s) + sum(max(col) for col in zip(*cost_im, strict=True))
    total = sum(map(sum, cost_s)) + sum(map(sum, cost_im))
    assert float(hardest_negative_triplet_loss(scores, margin, True)) == pytest.approx(hardest, abs=1e-6)
    assert float(hardest_negative_triplet_loss(scores, margin, False)) == pytest.approx(total, abs=1e-6)
    # well separated positives: zero loss; summed, so a doubled batch doubles the loss
    assert float(hardest_negative_triplet_loss(torch.eye(4) * 2)) == 0.0
    block = torch.block_diag(scores, scores) - 10 * (1 - torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)))
    assert float(hardest_negative_triplet_loss(block)) == pytest.approx(2 * hardest, abs=1e-5)
    with pytest.raises(ValueError, match="square"):
        hardest_negative_triplet_loss(torch.zeros(2, 3))


def test_average_scores_checks_shapes() -> None:
    a, b = torch.rand(3, 15), np.random.default_rng(0).random((3, 15))
    torch.testing.assert_close(average_scores([a, b]), (a.double() + torch.from_numpy(b)) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        average_scores([a])
    with pytest.raises(ValueError, match=r"score matrix 1 has shape \(3, 14\)"):
        average_scores([a, torch.rand(3, 14)])


def test_ensemble_scores_average_each_models_scores() -> None:
    torch.manual_seed(0)
    models = [create_model("scan_t2i_avg", **SMALL), create_model("scan_i2t_lse", **SMALL)]
    features, token_ids, lengths = _batch()
    ensemble = ensemble_scores(models, features, token_ids, lengths, batch_size=2, block_size=(2, 3))
    singles = [encode_and_score(model, features, token_ids, lengths, batch_size=3) for model in models]
    assert ensemble.shape == (5, 5)
    torch.testing.assert_close(ensemble, (singles[0] + singles[1]) / 2)
    with torch.no_grad():
        torch.testing.assert_close(singles[1], models[1].eval()(features, None, token_ids, lengths))
    assert models[0].training  # encode_and_score restores the mode


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_is_a_valid_params_choice_with_its_own_defaults(name: str) -> None:
    from pipeline.params import TrainParams

    params = TrainParams(model=name)
    assert params.model_options() == {}  # nothing set: every option comes from the registry/config
    data_sizes = {"vocab_size": 10} if model_text_input(name) == "words" else {"bert_dim": 12}
    config = model_config(name, **data_sizes)
    assert model_config(name, **data_sizes, **params.model_options()) == config
    rebuilt = create_model(name, **config.model_dump())
    assert rebuilt.config == config


def test_model_options_are_validated_by_the_models_config_only() -> None:
    from pipeline.params import TrainParams

    assert TrainParams(lambda_softmax=4.0).model_options() == {"lambda_softmax": 4.0}
    with pytest.raises(ValidationError, match=r"lambda_softmax.*greater than 0"):
        TrainParams(lambda_softmax=-1.0)
    with pytest.raises(ValidationError, match=r"raw_feature_norm.*'l3norm'"):
        TrainParams(raw_feature_norm="l3norm")
    with pytest.raises(ValidationError, match=r"unknown model 'scan_x'"):
        TrainParams(model="scan_x")


@pytest.mark.parametrize(("n_images", "n_captions"), [(5, 2), (2, 5)])
def test_encode_and_score_with_unequal_sides_matches_the_forward_pass(n_images: int, n_captions: int) -> None:
    """More images than captions or the reverse, with partial last batches: every score in its own cell."""
    torch.manual_seed(0)
    model = create_model("scan_t2i_avg", **SMALL)
    features, token_ids, lengths = _batch()
    features, token_ids, lengths = features[:n_images], token_ids[:n_captions], lengths[:n_captions]
    scores = encode_and_score(model, features, token_ids, lengths, batch_size=4)
    assert scores.shape == (n_images, n_captions)
    with torch.no_grad():
        torch.testing.assert_close(scores, model.eval()(features, None, token_ids, lengths))
