"""Checkpoint reading, key mapping (HF .bin, converted .pkl, .safetensors), safety and the `weights` CLI."""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from bua_recipe import recipe_weights, write_recipe_safetensors
from typer.testing import CliRunner

from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector
from extractors.bua.weights import (
    ANCHORS_KEY,
    WEIGHTS_NOT_GIVEN_MESSAGE,
    WeightsError,
    canonicalize,
    convert_checkpoint,
    expected_shapes,
    file_sha256,
    load_into,
    load_weights,
    read_checkpoint,
    tensors_sha256,
)


@pytest.fixture(scope="module")
def manifest(bua_fixtures: Path) -> dict:
    return json.loads((bua_fixtures / "weights_manifest.json").read_text())


@pytest.fixture(scope="module")
def recipe(bua_fixtures: Path) -> dict[str, np.ndarray]:
    return recipe_weights(str(bua_fixtures / "weights_manifest.json"))


@pytest.fixture(scope="module")
def published_files(
    recipe: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The recipe weights in the two published layouts (HF .bin with [1]-shaped counters, converted .pkl)."""
    folder = tmp_path_factory.mktemp("published")
    hf_state = {
        key: torch.from_numpy(value.reshape(1) if key.endswith("num_batches_tracked") else value)
        for key, value in recipe.items()
    }
    torch.save(hf_state, folder / "pytorch_model.bin")
    # The detectron2 .pkl: {"model": {name: ndarray}} plus metadata, without num_batches_tracked (FrozenBN).
    pkl_model = {key: value for key, value in recipe.items() if not key.endswith("num_batches_tracked")}
    with open(folder / "faster_rcnn_from_caffe_attr.pkl", "wb") as handle:
        pickle.dump({"model": pkl_model, "__author__": "test"}, handle, protocol=2)
    return {"bin": folder / "pytorch_model.bin", "pkl": folder / "faster_rcnn_from_caffe_attr.pkl"}


def test_recipe_reproduces_manifest_digests(recipe: dict[str, np.ndarray], manifest: dict) -> None:
    assert tensors_sha256(recipe) == manifest["weights_sha256"]
    for entry in manifest["entries"][:50]:
        assert tensors_sha256({entry["key"]: recipe[entry["key"]]})[:16] == entry["sha256_16"], entry["key"]


def test_canonical_layout_is_the_manifest_layout(manifest: dict) -> None:
    shapes = expected_shapes(DetectorConfig())
    assert list(shapes) == [entry["key"] for entry in manifest["entries"]]
    assert [list(s) for s in shapes.values()] == [entry["shape"] for entry in manifest["entries"]]


@pytest.mark.parametrize("layout", ["bin", "pkl"])
def test_published_layouts_load_and_keep_every_tensor(
    layout: str, published_files: dict[str, Path], manifest: dict
) -> None:
    raw = read_checkpoint(published_files[layout])
    canonical, report = canonicalize(raw, DetectorConfig(), source=layout)
    # Same tensors, same order, same bytes as the fixture recipe: the global digest must match.
    assert tensors_sha256(canonical) == manifest["weights_sha256"]
    assert report.anchors_match is True
    assert report.unexpected_keys == []
    if layout == "pkl":
        assert len(report.filled_keys) == 104
    else:
        assert report.filled_keys == []


def test_load_weights_fills_the_detector(
    published_files: dict[str, Path], recipe: dict[str, np.ndarray]
) -> None:
    detector = BottomUpAttentionDetector()
    report = load_weights(detector, published_files["bin"])
    assert report.sha256 == file_sha256(published_files["bin"])
    state = detector.state_dict()
    for key in (
        "backbone.stem.conv1.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "backbone.res4.22.conv3.weight",
    ):
        np.testing.assert_array_equal(state[key].numpy(), recipe[key])


def test_convert_roundtrip_and_cli(published_files: dict[str, Path], manifest: dict, tmp_path: Path) -> None:
    from stages.cli import app

    out = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(app, ["weights", "convert", str(published_files["pkl"]), str(out)])
    assert result.exit_code == 0, result.output
    assert file_sha256(out) in result.output
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file

    result = CliRunner().invoke(app, ["weights", "info", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("safetensors", "640", file_sha256(out), manifest["weights_sha256"], "match Caffe"):
        assert text in result.output
    bad = CliRunner().invoke(
        app, ["weights", "convert", str(published_files["pkl"]), str(tmp_path / "x.bin")]
    )
    assert bad.exit_code != 0
    assert "safetensors" in bad.output
    missing = CliRunner().invoke(app, ["weights", "info", str(tmp_path / "nope.bin")])
    assert missing.exit_code == 1
    assert "nope.bin" in missing.output


def test_write_recipe_safetensors_helper(bua_fixtures: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = write_recipe_safetensors(bua_fixtures / "weights_manifest.json", tmp_path / "w.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        keys = list(handle.keys())
        assert len(keys) == 640
        assert handle.get_tensor(ANCHORS_KEY).shape == (12, 4)


# ---- tiny-config mapping cases
TINY = DetectorConfig.tiny()


@pytest.fixture()
def tiny_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(TINY)
    for param in detector.parameters():
        param.data.normal_()
    state = {key: value.numpy().copy() for key, value in detector.state_dict().items()}
    return state


def test_prefix_and_counter_shapes_are_accepted(tiny_state: dict[str, np.ndarray]) -> None:
    prefixed = {
        f"model.{k}": (v.reshape(1) if k.endswith("num_batches_tracked") else v)
        for k, v in tiny_state.items()
    }
    canonical, report = canonicalize(prefixed, TINY)
    assert "stripped prefix 'model.'" in report.conversions
    assert report.anchors_match is None  # no anchors stored: the Caffe ones are generated
    np.testing.assert_array_equal(
        canonical["backbone.stem.conv1.weight"], tiny_state["backbone.stem.conv1.weight"]
    )
    assert canonical["backbone.stem.conv1.norm.num_batches_tracked"].shape == ()


def test_missing_key_is_named(tiny_state: dict[str, np.ndarray]) -> None:
    del tiny_state["roi_heads.res5.0.conv2.norm.running_var"]
    with pytest.raises(WeightsError, match=r"roi_heads\.res5\.0\.conv2\.norm\.running_var"):
        canonicalize(tiny_state, TINY, source="my.bin")


def test_wrong_shape_is_named(tiny_state: dict[str, np.ndarray]) -> None:
    tiny_state["proposal_generator.rpn_head.conv.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(
        WeightsError, match=r"my\.bin: key 'proposal_generator\.rpn_head\.conv\.weight' has shape"
    ):
        canonicalize(tiny_state, TINY, source="my.bin")


def test_unexpected_keys_are_reported(tiny_state: dict[str, np.ndarray]) -> None:
    tiny_state["roi_heads.extra_head.weight"] = np.zeros(3, np.float32)
    _, report = canonicalize(tiny_state, TINY)
    assert report.unexpected_keys == ["roi_heads.extra_head.weight"]
    assert "unexpected" in report.summary()


def test_caffe_softmax_objectness_converts_to_the_same_probability(tiny_state: dict[str, np.ndarray]) -> None:
    key = "proposal_generator.rpn_head.objectness_logits"
    logit_w, logit_b = tiny_state[key + ".weight"], tiny_state[key + ".bias"]
    rng = np.random.default_rng(1)
    bg_w = rng.standard_normal(logit_w.shape).astype(np.float32)
    bg_b = rng.standard_normal(logit_b.shape).astype(np.float32)
    caffe = dict(tiny_state)
    caffe[key + ".weight"] = np.concatenate(
        (bg_w, bg_w + logit_w)
    )  # channels: A background, then A foreground
    caffe[key + ".bias"] = np.concatenate((bg_b, bg_b + logit_b))
    canonical, report = canonicalize(caffe, TINY)
    assert any("objectness" in note for note in report.conversions)
    np.testing.assert_allclose(canonical[key + ".weight"], logit_w, atol=1e-5)
    # softmax(bg, fg)[fg] == sigmoid(fg - bg) on a random hidden vector
    hidden = rng.standard_normal(logit_w.shape[1]).astype(np.float32)
    fg = (
        caffe[key + ".weight"][TINY.num_anchors :, :, 0, 0] @ hidden
        + caffe[key + ".bias"][TINY.num_anchors :]
    )
    bg = (
        caffe[key + ".weight"][: TINY.num_anchors, :, 0, 0] @ hidden
        + caffe[key + ".bias"][: TINY.num_anchors]
    )
    softmax_fg = np.exp(fg) / (np.exp(fg) + np.exp(bg))
    logits = canonical[key + ".weight"][:, :, 0, 0] @ hidden + canonical[key + ".bias"]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), softmax_fg, atol=1e-5)


def test_background_first_layout_is_reordered(tiny_state: dict[str, np.ndarray]) -> None:
    caffe = dict(tiny_state)
    for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"):
        caffe[key] = np.concatenate((tiny_state[key][-1:], tiny_state[key][:-1]))
    bbox_w = tiny_state["roi_heads.box_predictor.bbox_pred.weight"]
    caffe["roi_heads.box_predictor.bbox_pred.weight"] = np.concatenate(
        (np.zeros((4, bbox_w.shape[1]), bbox_w.dtype), bbox_w)
    )
    caffe["roi_heads.box_predictor.bbox_pred.bias"] = np.concatenate(
        (np.zeros(4, np.float32), tiny_state["roi_heads.box_predictor.bbox_pred.bias"])
    )
    for key in ("roi_heads.box_predictor.cls_embedding.weight",):
        caffe[key] = np.concatenate((tiny_state[key][-1:], tiny_state[key][:-1]))
    for key in ("roi_heads.box_predictor.attr_score.weight", "roi_heads.box_predictor.attr_score.bias"):
        caffe[key] = np.concatenate((tiny_state[key][-1:], tiny_state[key][:-1]))
    canonical, report = canonicalize(caffe, TINY)  # "auto" infers Caffe order from the 4*(C+1)-row bbox_pred
    assert any("background-first" in note for note in report.conversions)
    for key in (
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_embedding.weight",
        "roi_heads.box_predictor.attr_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
    ):
        np.testing.assert_array_equal(canonical[key], tiny_state[key])


def test_anchor_mismatch_is_reported_with_a_warning(tiny_state: dict[str, np.ndarray]) -> None:
    state = dict(tiny_state)
    state[ANCHORS_KEY] = np.zeros(
        (TINY.num_anchors, 4), np.float32
    )  # detectron2-style anchors would differ too
    detector = BottomUpAttentionDetector(TINY)
    with pytest.warns(UserWarning, match="differ from the Caffe anchors"):
        report = load_into(detector, state)
    assert report.anchors_match is False
    assert report.anchors_max_diff and report.anchors_max_diff > 1


def test_malicious_pickle_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": Exploit()}}))
    with pytest.raises(WeightsError, match=r"evil\.pkl: refusing to unpickle global '(posix|os|nt)\.system'"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickles_of_any_protocol_load_identically(tmp_path: Path, protocol: int) -> None:
    """Every plain numeric dtype, byte order and memory order numpy pickles comes back bit for bit."""
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i64_scalar": np.zeros((), np.int64),
        "f64_big_endian_fortran": np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3)),
        "f16_strided": np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2],
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        **{kind: np.arange(4).astype(kind) for kind in ("i1", "i2", "i4", "u1", "u2", "u4", "u8")},
    }
    path = tmp_path / f"p{protocol}.pkl"
    metadata = {"__author__": "test", "matching_heuristics": True, "iteration": np.int64(3)}
    path.write_bytes(pickle.dumps({"model": collections.OrderedDict(arrays), **metadata}, protocol=protocol))
    loaded = read_checkpoint(path)
    assert list(loaded) == list(arrays)
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape, key
        assert loaded[key].tobytes() == array.tobytes() and loaded[key].flags.writeable, key


def test_unreadable_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        read_checkpoint(tmp_path / "missing.bin")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.bin: cannot read"):
        read_checkpoint(junk)


def test_missing_weights_message_says_where_to_get_them() -> None:
    assert "unc-nlp/frcnn-vg-finetuned" in WEIGHTS_NOT_GIVEN_MESSAGE
    assert "faster_rcnn_from_caffe_attr.pkl" in WEIGHTS_NOT_GIVEN_MESSAGE
    assert "--weights random" in WEIGHTS_NOT_GIVEN_MESSAGE


def test_convert_tiny_checkpoint_to_safetensors(tiny_state: dict[str, np.ndarray], tmp_path: Path) -> None:
    src = tmp_path / "tiny.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tiny_state.items()}}, src)
    out = tmp_path / "tiny.safetensors"
    report = convert_checkpoint(src, out, TINY)
    assert report.num_keys == len(tiny_state) + 1  # + the generated anchors
    detector = BottomUpAttentionDetector(TINY)
    load_weights(detector, out)
    np.testing.assert_array_equal(
        detector.state_dict()["roi_heads.box_predictor.attr_score.weight"].numpy(),
        tiny_state["roi_heads.box_predictor.attr_score.weight"],
    )
