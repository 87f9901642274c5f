"""Checkpoints: exact round trip of weights and optimizer state, atomic overwrite, clear errors, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    CHECKPOINT_JSON,
    MODEL_FILE,
    OPTIMIZER_FILE,
    VOCAB_FILE,
    CheckpointError,
    bytes_to_json,
    copy_checkpoint,
    json_to_byte_tensor,
    load_checkpoint,
    load_model,
    load_optimizer_state,
    read_checkpoint_info,
    save_checkpoint,
)
from pipeline.models.build import create_model

TINY = {"vocab_size": 23, "img_dim": 12, "embed_size": 8, "word_dim": 6}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _trained_model_and_optimizer(name: str = "scan_t2i_avg") -> tuple[torch.nn.Module, torch.optim.Adam]:
    torch.manual_seed(0)
    model = create_model(name, **TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    regions = torch.randn(4, 5, TINY["img_dim"])
    tokens = torch.randint(1, TINY["vocab_size"], (4, 7))
    lengths = torch.tensor([7, 5, 3, 6])
    for _ in range(2):
        optimizer.zero_grad()
        model(regions, torch.full((4,), 5), tokens, lengths).sum().backward()
        optimizer.step()
    return model, optimizer


def _save(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: Path | None
) -> Path:
    return save_checkpoint(
        directory,
        model,
        model_name="scan_t2i_avg",
        model_config=model.config,
        epoch=3,
        optimizer=optimizer,
        lr=1e-3,
        metrics={"rsum": 123.5},
        rng_state={"torch_cpu": bytes_to_json(torch.get_rng_state())},
        vocab_path=vocab,
    )


def test_round_trip_restores_weights_optimizer_and_metadata(tmp_path: Path) -> None:
    model, optimizer = _trained_model_and_optimizer()
    vocab = tmp_path / "vocab.json"
    vocab.write_text('{"not": "checked here"}')
    path = _save(tmp_path / "ckpt", model, optimizer, vocab)

    assert sorted(p.name for p in path.iterdir()) == sorted(
        [CHECKPOINT_JSON, MODEL_FILE, OPTIMIZER_FILE, VOCAB_FILE]
    )
    restored, info = load_checkpoint(path)
    assert info.model_name == "scan_t2i_avg" and info.epoch == 3 and info.metrics["rsum"] == 123.5
    assert info.vocab_path == path / VOCAB_FILE and info.vocab_path.read_text() == vocab.read_text()
    for (name, expected), (other, actual) in zip(
        model.state_dict().items(), restored.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(expected, actual), name
    assert restored.config == model.config

    fresh = torch.optim.Adam(restored.parameters(), lr=5.0)
    load_optimizer_state(fresh, path)
    assert fresh.param_groups[0]["lr"] == 1e-3
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert sorted(saved_state) == sorted(loaded_state)
    for index, original in saved_state.items():
        loaded = loaded_state[index]
        assert torch.equal(original["exp_avg"], loaded["exp_avg"])
        assert torch.equal(original["exp_avg_sq"], loaded["exp_avg_sq"])
        assert float(original["step"]) == float(loaded["step"])
    assert json_to_byte_tensor(info.rng_state["torch_cpu"]).shape == torch.get_rng_state().shape


def test_rng_state_survives_json(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1234)
    text = bytes_to_json(generator.get_state())
    expected = torch.rand(5, generator=generator)
    replay = torch.Generator()
    replay.set_state(json_to_byte_tensor(json.loads(json.dumps(text))))
    assert torch.equal(torch.rand(5, generator=replay), expected)


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path: Path) -> None:
    model, optimizer = _trained_model_and_optimizer()
    path = _save(tmp_path / "last", model, optimizer, None)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    save_checkpoint(path, model, model_name="scan_t2i_avg", model_config=model.config, epoch=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    info = read_checkpoint_info(path)
    assert info.epoch == 4 and not info.has_optimizer and info.vocab_path is None
    assert torch.equal(load_model(path).image_encoder.fc.weight, model.image_encoder.fc.weight)

    best = copy_checkpoint(path, tmp_path / "best")
    assert read_checkpoint_info(best).epoch == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]


def test_variant_mismatch_names_file_and_both_variants(tmp_path: Path) -> None:
    model, optimizer = _trained_model_and_optimizer()
    path = _save(tmp_path / "ckpt", model, optimizer, None)
    with pytest.raises(CheckpointError) as error:
        load_model(path, expect_model="scan_i2t_lse")
    message = str(error.value)
    assert str(path) in message and "scan_t2i_avg" in message and "scan_i2t_lse" in message


def test_weights_of_another_shape_are_rejected(tmp_path: Path) -> None:
    model, optimizer = _trained_model_and_optimizer()
    path = _save(tmp_path / "ckpt", model, optimizer, None)
    document = json.loads((path / CHECKPOINT_JSON).read_text())
    document["model_config"]["embed_size"] = 16
    (path / CHECKPOINT_JSON).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


@pytest.mark.parametrize(
    "damage",
    ["missing_dir", "plain_file", "no_json", "not_json", "foreign_json", "corrupt_weights"],
)
def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    model, optimizer = _trained_model_and_optimizer()
    path = _save(tmp_path / "ckpt", model, optimizer, None)
    target = path
    if damage == "missing_dir":
        target = tmp_path / "nowhere"
    elif damage == "plain_file":
        target = tmp_path / "weights.pth"
        target.write_bytes(b"\x80\x04not a pickle we would ever load")
    elif damage == "no_json":
        (path / CHECKPOINT_JSON).unlink()
    elif damage == "not_json":
        (path / CHECKPOINT_JSON).write_text("{ nope")
    elif damage == "foreign_json":
        (path / CHECKPOINT_JSON).write_text(json.dumps({"model": "something else"}))
    elif damage == "corrupt_weights":
        (path / MODEL_FILE).write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError) as error:
        load_model(target)
    assert str(target) in str(error.value)
