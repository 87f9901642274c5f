"""`scan-pipe explain`: the weights shown are the scorer's, the score the evaluated one; figures, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.evaluation import encode_and_score
from pipeline.explain import CaptionInput, ExplainError, explain_pair
from pipeline.explain_render import blend_heat, region_heat, write_explanation_figures
from pipeline.models.build import create_model
from pipeline.models.registry import list_models, model_family
from pipeline.models.xattn import xattn_relevance
from pipeline.store import FeatureStore, RegionRecord
from pipeline.store_writer import FeatureStoreWriter
from pipeline.vocab import build_vocabulary, load_vocabulary

pytestmark = pytest.mark.usefixtures("single_torch_thread")

IMG_DIM = 8
SCAN_MODELS = [name for name in list_models() if model_family(name) == "scan"]
MMCA_SIZES = {"img_dim": IMG_DIM, "bert_dim": 12, "embed_size": 16, "num_heads": 4, "cnn_filters": 8}
CAPTION = "a red dog near the tree"
OBJECT_NAMES = ["dog,puppy", "cat", "tree", "grass", "sky"]


@dataclass(frozen=True)
class Tiny:
    """A two-image store (one image id without a JPEG), its images and a word vocabulary."""

    root: Path
    features: Path
    images: Path
    vocab_path: Path


def _record(image_id: str, width: int, height: int, n: int, rng: np.random.Generator) -> RegionRecord:
    x1 = rng.uniform(0, width / 2, n)
    y1 = rng.uniform(0, height / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(8, width / 2, n), y1 + rng.uniform(8, height / 2, n)], axis=1)
    return RegionRecord(
        image_id=image_id,
        image_w=width,
        image_h=height,
        boxes=boxes.astype(np.float32),
        features=rng.normal(size=(n, IMG_DIM)).astype(np.float32),
        object_ids=(np.arange(n) % len(OBJECT_NAMES)).astype(np.int32),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(7)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for image_id, (width, height) in {"scene_0.jpg": (64, 48), "sub/scene_1.jpg": (80, 60)}.items():
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        pixels[10:30, 10:40] = (220, 40, 30)
        Image.fromarray(pixels).save(images / image_id, quality=90)
    with FeatureStoreWriter(root / "features", metadata={"object_names": OBJECT_NAMES}) as writer:
        writer.add(_record("scene_0.jpg", 64, 48, 3, rng))
        writer.add(_record("sub/scene_1.jpg", 80, 60, 5, rng))
        writer.add(_record("ghost.jpg", 64, 48, 4, rng))  # in the store, no JPEG
    vocab = build_vocabulary(["a red dog near the tree", "a cat on the grass", "the sky and a dog"], 1)
    vocab_path = vocab.save(root / "vocab.json")
    return Tiny(root, root / "features", images, vocab_path)


@pytest.fixture(scope="module")
def checkpoints(tiny: Tiny) -> dict[str, Path]:
    """A small random checkpoint of every SCAN variant in the registry, and of MMCA (no BERT recorded)."""
    vocab_size = len(load_vocabulary(tiny.vocab_path))
    saved = {}
    for seed, name in enumerate([*SCAN_MODELS, "mmca"]):
        torch.manual_seed(seed)
        if name == "mmca":
            model = create_model(name, **MMCA_SIZES)
        else:
            model = create_model(name, vocab_size=vocab_size, img_dim=IMG_DIM, embed_size=16, word_dim=8)
        vocab = tiny.vocab_path if name != "mmca" else None
        saved[name] = save_checkpoint(
            tiny.root / "ckpt" / name,
            model,
            model_name=name,
            model_config=model.config,
            epoch=1,
            vocab_path=vocab,
        )
    return saved


def _stored(tiny: Tiny, image_id: str = "sub/scene_1.jpg") -> RegionRecord:
    return FeatureStore(tiny.features).read([image_id])[0]


class RowsReader:
    """A stand-in for the frozen BERT: fixed random rows per token (MMCA tests without loading BERT)."""

    def read(self, caption: str) -> CaptionInput:
        tokens = ("[CLS]", *caption.split(), "[SEP]")
        generator = torch.Generator().manual_seed(len(tokens))
        rows = torch.randn(len(tokens), MMCA_SIZES["bert_dim"], generator=generator)
        return CaptionInput(tokens, rows)


def _aggregate(relevance: np.ndarray, agg: str, lambda_lse: float) -> float:
    values = torch.from_numpy(relevance).double()
    if agg == "LogSumExp":
        return float(torch.logsumexp(values * lambda_lse, dim=0) / lambda_lse)
    return float(values.mean())


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("name", SCAN_MODELS)
def test_scan_weights_are_the_scorers_and_the_score_is_the_evaluation_paths(
    tiny: Tiny, checkpoints: dict[str, Path], name: str
) -> None:
    model, info = load_checkpoint(checkpoints[name])
    record = _stored(tiny)
    explanation = explain_pair(model, info, record.features, record.boxes, CAPTION)

    ids = torch.tensor([load_vocabulary(tiny.vocab_path).encode(CAPTION)])
    regions = torch.from_numpy(np.array(record.features, dtype=np.float32))[None]
    config = model.config
    model.eval()
    with torch.no_grad():
        images = model.encode_images(regions, torch.tensor([regions.shape[1]]))
        captions = model.encode_captions(ids, torch.tensor([ids.shape[1]]))
        found = xattn_relevance(
            images,
            captions,
            [ids.shape[1]],
            direction=config.direction,
            raw_feature_norm=config.raw_feature_norm,
            lambda_softmax=config.lambda_softmax,
        )
    assert np.array_equal(explanation.attention, found.attention[0, 0].numpy())  # the weights used, exactly
    assert np.array_equal(explanation.relevance, found.relevance[0, 0].numpy())
    queries = ids.shape[1] if config.direction == "t2i" else regions.shape[1]
    contexts = regions.shape[1] if config.direction == "t2i" else ids.shape[1]
    assert explanation.attention.shape == (queries, contexts)
    np.testing.assert_allclose(explanation.attention.sum(axis=1), 1.0, rtol=1e-5)  # softmax over contexts

    evaluated = encode_and_score(model, regions, ids, torch.tensor([ids.shape[1]]))[0, 0]
    assert explanation.score == pytest.approx(float(evaluated), abs=1e-6)
    # and the score is the variant's aggregation of the relevances shown
    assert _aggregate(explanation.relevance, config.agg, config.lambda_lse) == pytest.approx(
        explanation.score, abs=1e-5
    )
    assert explanation.tokens == ("<start>", "a", "red", "dog", "near", "the", "tree", "<end>")
    assert explanation.direction == config.direction and explanation.queries in ("words", "regions")


def test_mmca_shows_its_cross_units_word_to_region_attention(
    tiny: Tiny, checkpoints: dict[str, Path]
) -> None:
    model, info = load_checkpoint(checkpoints["mmca"])
    record = _stored(tiny)
    explanation = explain_pair(model, info, record.features, record.boxes, CAPTION, reader=RowsReader())

    text = RowsReader().read(CAPTION)
    n_regions, n_words = record.num_boxes, len(text.tokens)
    regions = torch.from_numpy(np.array(record.features, dtype=np.float32))[None]
    region_lengths, word_lengths = torch.tensor([n_regions]), torch.tensor([n_words])
    model.eval()
    with torch.no_grad():
        trace = model.intermediates(regions, region_lengths, text.inputs[None], word_lengths, pairs=[(0, 0)])
    weights = trace["pair0__cross_attention"]  # (heads, regions + words, regions + words)
    expected = weights[:, n_regions:, :n_regions].mean(dim=0)
    assert np.array_equal(explanation.attention, expected.numpy())
    assert explanation.attention.shape == (n_words, n_regions)
    # the softmax runs over regions and words: the mass on regions is below 1, the rest is on the words
    np.testing.assert_allclose(explanation.relevance, expected.sum(dim=1).numpy())
    assert np.all(explanation.relevance > 0) and np.all(explanation.relevance < 1)
    on_words = weights[:, n_regions:, n_regions:].mean(dim=0).sum(dim=1)
    np.testing.assert_allclose(explanation.relevance + on_words.numpy(), 1.0, rtol=1e-5)

    evaluated = encode_and_score(model, regions, text.inputs[None], word_lengths, region_lengths)[0, 0]
    assert explanation.score == pytest.approx(float(evaluated), abs=1e-6)
    assert explanation.family == "mmca" and explanation.num_heads == MMCA_SIZES["num_heads"]
    assert "AND words" in explanation.note


def test_a_caption_of_unknown_words_only_is_refused_and_partly_unknown_is_marked(
    tiny: Tiny, checkpoints: dict[str, Path]
) -> None:
    model, info = load_checkpoint(checkpoints["scan_t2i_avg"])
    record = _stored(tiny)
    with pytest.raises(ExplainError, match="every word is outside the vocabulary"):
        explain_pair(model, info, record.features, record.boxes, "zebra xylophone")
    with pytest.raises(ExplainError, match="empty"):
        explain_pair(model, info, record.features, record.boxes, " \t ")
    explanation = explain_pair(model, info, record.features, record.boxes, "a zebra near the dog")
    assert explanation.unknown_words == ("zebra",) and "zebra (unk)" in explanation.tokens


# ------------------------------------------------------------------------------------------------ figures


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert np.asarray(image.convert("L")).std() > 5, f"{path} looks blank"


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("scan_t2i_avg", "attention_words.png"),
        ("scan_i2t_lse", "attention_regions.png"),
        ("mmca", "attention_words.png"),
    ],
)
def test_figures_render(
    tiny: Tiny, checkpoints: dict[str, Path], tmp_path: Path, name: str, first: str
) -> None:
    model, info = load_checkpoint(checkpoints[name])
    record = _stored(tiny)
    reader = RowsReader() if name == "mmca" else None
    explanation = explain_pair(
        model, info, record.features, record.boxes, CAPTION, reader=reader, image_size=(80, 60)
    )
    with Image.open(tiny.images / "sub/scene_1.jpg") as source:
        picture = source.convert("RGB")
    written = write_explanation_figures(explanation, picture, tmp_path / "out", region_names=["dog"] * 5)
    assert [path.name for path in written] == [first, "overview.png"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted([first, "overview.png"])
    for path in written:
        _assert_png(path)


def test_overlapping_boxes_take_the_larger_weight() -> None:
    boxes = np.array([[0, 0, 6, 4], [3, 2, 8, 6]], dtype=np.float32)
    heat = region_heat(boxes, np.array([0.2, 0.7]), width=10, height=8)
    assert heat[1, 1] == pytest.approx(0.2) and heat[5, 7] == pytest.approx(0.7)
    assert heat[3, 4] == pytest.approx(0.7)  # inside both boxes: the maximum, not the sum
    assert np.isnan(heat[7, 9])  # outside every box
    heat = region_heat(boxes, np.array([0.9, 0.1]), width=10, height=8)
    assert heat[3, 4] == pytest.approx(0.9)
    picture = Image.new("RGB", (10, 8), (128, 128, 128))
    tinted = np.asarray(blend_heat(picture, boxes, np.array([0.2, 0.7])))
    assert np.all(tinted[7, 9] == 128) and not np.all(tinted[3, 4] == 128)


# ---------------------------------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    import stages.explain

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A group, so that the command keeps its name."""

    stages.explain.register(app)
    return app


def _invoke(tiny: Tiny, checkpoint: Path, out: Path, **changes: str):
    options = {
        "--checkpoint": str(checkpoint),
        "--features": str(tiny.features),
        "--images": str(tiny.images),
        "--image-id": "sub/scene_1.jpg",
        "--caption": CAPTION,
        "--out": str(out),
        **changes,
    }
    args = ["explain"] + [item for pair in options.items() for item in pair]
    return CliRunner().invoke(_app(), args)


def test_cli_prints_the_score_relevances_and_figures(
    tiny: Tiny, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model, info = load_checkpoint(checkpoints["scan_t2i_lse"])
    record = _stored(tiny)
    expected = explain_pair(model, info, record.features, record.boxes, CAPTION)
    result = _invoke(tiny, checkpoints["scan_t2i_lse"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"score {expected.score:.6f}" in result.output
    for token, relevance in zip(expected.tokens, expected.relevance, strict=True):
        assert any(token in line and f"{relevance:.4f}" in line for line in result.output.splitlines()), token
    for name in ("attention_words.png", "overview.png"):
        assert str(tmp_path / "out" / name) in result.output
        _assert_png(tmp_path / "out" / name)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"--image-id": "nope.jpg"}, ["nope.jpg", "not in the feature store"]),
        ({"--image-id": "ghost.jpg"}, ["ghost.jpg", "not found"]),
        ({"--caption": "   "}, ["caption is empty"]),
        ({"--caption": "zebra xylophone!"}, ["zebra", "outside the vocabulary", "vocab.json"]),
        ({"--checkpoint": "NOT_A_CHECKPOINT"}, ["not a checkpoint"]),
        ({"--checkpoint": "MISSING"}, ["checkpoint not found"]),
    ],
)
def test_cli_bad_input_is_one_line_naming_it(
    tiny: Tiny, checkpoints: dict[str, Path], tmp_path: Path, change: dict[str, str], named: list[str]
) -> None:
    if change.get("--checkpoint") == "NOT_A_CHECKPOINT":
        (tmp_path / "plain").mkdir()
        change = {"--checkpoint": str(tmp_path / "plain")}
    elif change.get("--checkpoint") == "MISSING":
        change = {"--checkpoint": str(tmp_path / "missing")}
    result = _invoke(tiny, checkpoints["scan_t2i_avg"], tmp_path / "out", **change)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(part in lines[0] for part in named), lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_explains_mmca_with_the_bert_the_checkpoint_records(tiny: Tiny, tmp_path: Path) -> None:
    """End to end with the bundled MiniLM (loads it: seconds)."""
    from pipeline.bert_text import bert_identity, resolve_bert_path
    from pipeline.text_inputs import BERT_EXTRA_KEY

    identity = bert_identity(resolve_bert_path("sample"))
    torch.manual_seed(0)
    model = create_model("mmca", **{**MMCA_SIZES, "bert_dim": identity.hidden_size})
    checkpoint = save_checkpoint(
        tmp_path / "mmca",
        model,
        model_name="mmca",
        model_config=model.config,
        epoch=1,
        extra={BERT_EXTRA_KEY: identity.to_json()},
    )
    result = _invoke(tiny, checkpoint, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "mass on regions" in result.output and "[CLS]" in result.output and "score " in result.output
    _assert_png(tmp_path / "out" / "attention_words.png")
