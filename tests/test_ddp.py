"""DistributedDataParallel on CPU: 2 gloo processes under torchrun follow the single-process math."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import one_step
from safetensors.torch import load_file
from synthetic import make_synthetic_dataset

from pipeline.checkpoint import load_model, read_checkpoint_info
from pipeline.distributed import DistributedContext
from pipeline.params import TrainParams
from pipeline.train import build_seeded_model, train

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_PARAMS = TrainParams(
    model="scan_i2t_avg",
    embed_size=16,
    word_dim=8,
    epochs=2,
    lr=2e-3,
    batch_size=16,
    val_max_images=10,
    seed=1,
)


pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]  # torchrun subprocesses


def _torchrun(out: Path, train_spec: dict) -> subprocess.CompletedProcess:
    spec_path = out / "train_args.json"
    spec_path.write_text(json.dumps(train_spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO_ROOT / "tests" / "ddp_worker.py"),
        "--out",
        str(out),
        "--train-args",
        str(spec_path),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_two_gloo_processes_match_a_single_process(tmp_path: Path) -> None:
    data = make_synthetic_dataset(
        tmp_path / "data", splits={"train": 32, "val": 10}, img_dim=16, num_concepts=10, variable_regions=True
    )
    common = {
        "features_dir": str(data.features_dir),
        "train_captions": str(data.captions["train"]),
        "val_captions": str(data.captions["val"]),
        "vocab_path": str(data.vocab_path),
        "cache_dir": str(data.root / "cache"),
    }
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    completed = _torchrun(
        ddp_out, {"params": TRAIN_PARAMS.model_dump(), "out_dir": str(ddp_out / "run"), **common}
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    # One step: the 2-rank step over the gathered global batch equals the single-process step.
    single_weights, single_loss = one_step(DistributedContext())
    ddp_weights = load_file(str(ddp_out / "ddp_step.safetensors"))
    report = json.loads((ddp_out / "ddp_step.json").read_text())
    assert report["world_size"] == 2
    assert report["loss"] == pytest.approx(single_loss, rel=1e-5)
    assert ddp_weights.keys() == single_weights.keys()
    for name, expected in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], expected, rtol=0, atol=1e-5, msg=name)

    # A short training run: rank 0 wrote every epoch once, and the weights follow the single-process run.
    train(TRAIN_PARAMS, out_dir=tmp_path / "single", device="cpu", progress=False, **common)
    ddp_log = (ddp_out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in ddp_log] == [1, 2]
    assert sorted(p.name for p in (ddp_out / "run" / "checkpoints").iterdir()) == ["best", "last"]
    info = read_checkpoint_info(ddp_out / "run/checkpoints/last")
    assert info.epoch == 2 and info.extra["world_size"] == 2
    ddp_model = load_model(ddp_out / "run/checkpoints/last").state_dict()
    single_model = load_model(tmp_path / "single/checkpoints/last").state_dict()
    for name, expected in single_model.items():
        torch.testing.assert_close(ddp_model[name], expected, rtol=0, atol=1e-4, msg=name)


def test_mmca_two_gloo_processes_match_a_single_process(tmp_path: Path) -> None:
    """MMCA under torchrun: every rank scores the gathered global batch; weights follow one process."""
    from pipeline.text_features import write_text_features

    data = make_synthetic_dataset(
        tmp_path / "data", splits={"train": 16, "val": 6}, img_dim=16, num_concepts=10, variable_regions=True
    )
    text = tmp_path / "text"
    for split, captions in data.captions.items():
        write_text_features(captions, text / split, "sample", dtype="float32", device="cpu", progress=False)
    params = TrainParams(
        model="mmca", embed_size=8, num_heads=2, cnn_filters=4, epochs=2, batch_size=8, seed=1, amp=False
    )
    common = {
        "features_dir": str(data.features_dir),
        "train_captions": str(data.captions["train"]),
        "val_captions": str(data.captions["val"]),
        "vocab_path": None,
        "text_features": str(text),
        "cache_dir": str(data.root / "cache"),
    }
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    completed = _torchrun(ddp_out, {"params": params.model_dump(), "out_dir": str(ddp_out / "run"), **common})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    train(params, out_dir=tmp_path / "single", device="cpu", progress=False, **common)
    info = read_checkpoint_info(ddp_out / "run/checkpoints/last")
    assert info.model_name == "mmca" and info.epoch == 2 and info.extra["world_size"] == 2
    ddp_model = load_model(ddp_out / "run/checkpoints/last").state_dict()
    single_model = load_model(tmp_path / "single/checkpoints/last").state_dict()
    for name, expected in single_model.items():
        torch.testing.assert_close(ddp_model[name], expected, rtol=0, atol=1e-4, msg=name)
    start = build_seeded_model(params.resolved(), img_dim=16, bert_dim=info.model_config["bert_dim"])
    moved = max(float((ddp_model[k] - v).abs().max()) for k, v in start.state_dict().items())
    assert moved > 1e-3  # it trained: the agreement above is not two untouched initialisations
