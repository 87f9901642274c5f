"""The trainer's step equals the official SCAN `train_emb` (fixtures: scan_official README §8-9).

Three official training steps from the `runs/<config>` checkpoint on explicit batches are replayed through
`pipeline.train.training_steps`, which runs the epoch loop's own per-batch function. Everything is read from
the fixture files (a hidden copy has other sizes and seed). Deviations are printed: run with `-s` to see them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic import SyntheticDataset, make_synthetic_dataset
from torch import nn

from pipeline.captions import read_captions
from pipeline.checkpoint import OPTIMIZER_FILE, load_checkpoint, load_model, read_checkpoint_info
from pipeline.evaluation import encode_and_score
from pipeline.loaders import (
    EpochBatchSampler,
    PairBatch,
    PairDataset,
    collate_pairs,
    map_image_ids,
    open_feature_table,
    pad_tokens,
    tokenize_captions,
)
from pipeline.metrics import retrieval_metrics
from pipeline.official_import import import_official
from pipeline.params import TrainParams
from pipeline.train import StepResult, TrainingError, build_seeded_model, train, training_steps
from pipeline.vocab import Vocabulary

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# official parameter-name prefixes (checkpoint["model"][0] / [1]) -> scan-pipe module names
OFFICIAL_PREFIXES = {"img_enc.": "image_encoder.", "txt_enc.": "text_encoder."}
CAPTIONS_PER_IMAGE = 5  # the official loader's im_div
TRAINING_FIXTURE = "train_t2i_lse"  # expected/<name>.{json,npz}; its "config" names the run under runs/


@dataclass(frozen=True)
class Reference:
    """The official training fixture: arrays, batches, the configuration's `opt`, the tokenised splits."""

    root: Path
    arrays: dict[str, np.ndarray]
    spec: dict[str, Any]  # train_<config>.json
    opt: dict[str, Any]  # manifest configs[<config>].opt: every official train.py option
    tokens: dict[str, list[dict[str, Any]]]  # tokens.json splits

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays `prefix/<official name>`, keyed by scan-pipe parameter name."""
        return {
            _ours(key.split("/", 1)[1]): value
            for key, value in self.arrays.items()
            if key.startswith(prefix + "/")
        }


@dataclass
class Run:
    """A model after the fixture's steps, with what each step returned."""

    model: nn.Module
    steps: list[StepResult]


def _ours(official: str) -> str:
    for prefix, replacement in OFFICIAL_PREFIXES.items():
        if official.startswith(prefix):
            return replacement + official[len(prefix) :]
    raise AssertionError(f"unexpected official parameter name {official!r}")


def _report(check: str, measured: float, tolerance: str) -> None:
    print(f"  {check}: {measured:.3g}  (tolerance {tolerance})")


def _max_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def _max_abs(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    assert actual.keys() == expected.keys()
    return max(float(np.max(np.abs(actual[name] - expected[name]))) for name in expected)


def _model_name(opt: dict[str, Any]) -> str:
    return f"scan_{opt['cross_attn']}_{'lse' if opt['agg_func'] == 'LogSumExp' else 'avg'}"


def _official_params(opt: dict[str, Any], **updates: Any) -> TrainParams:
    """The training options of the official run, in float32 on the CPU (the official trains without AMP)."""
    return TrainParams(
        model=_model_name(opt),
        lr=opt["learning_rate"],
        lr_update=opt["lr_update"],
        margin=opt["margin"],
        max_violation=opt["max_violation"],
        grad_clip=opt["grad_clip"],
        batch_size=opt["batch_size"],
        amp=False,
        device="cpu",
        **updates,
    )


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(scan_official_fixtures: Path) -> Reference:
    expected = scan_official_fixtures / "expected"
    spec = json.loads((expected / f"{TRAINING_FIXTURE}.json").read_text())
    manifest = json.loads((scan_official_fixtures / "manifest.json").read_text())
    with np.load(expected / f"{TRAINING_FIXTURE}.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    tokens = json.loads((expected / "tokens.json").read_text())["splits"]
    return Reference(scan_official_fixtures, arrays, spec, manifest["configs"][spec["config"]]["opt"], tokens)


@pytest.fixture(scope="module")
def initial_model(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """The official checkpoint's model, read by the project's importer."""
    root, opt = reference.root, reference.opt
    out_dir = tmp_path_factory.mktemp("official") / "imported"
    import_official(
        root / "runs" / reference.spec["config"] / "model_best.pth.tar",
        root / "vocab" / f"{opt['data_name']}_vocab.json",
        out_dir,
    )
    model, _ = load_checkpoint(out_dir)
    return model


def _feature_rows(ref: Reference, split: str) -> dict[int, int]:
    """Caption index -> the features row the official loader reads (row j // 5, or j in the per-caption
    layout)."""
    return {row["index"]: row["ims_row"] for row in ref.tokens[split]}


def _official_batches(ref: Reference, dtype: torch.dtype) -> list[PairBatch]:
    """The fixture's collated batches (sorted ids, lengths, padded targets), features cast to `dtype`."""
    features = np.load(ref.root / "data" / "tiny_precomp" / "train_ims.npy").astype(np.float32)
    rows = _feature_rows(ref, "train")
    batches = []
    for step in ref.spec["batches"]:
        ids = step["sorted_ids"]
        regions = torch.from_numpy(features[[rows[j] for j in ids]]).to(dtype)
        batches.append(
            PairBatch(
                region_features=regions,
                region_lengths=torch.full((len(ids),), regions.shape[1], dtype=torch.int64),
                caption_inputs=torch.tensor(step["targets"], dtype=torch.int64),
                caption_lengths=torch.tensor(step["lengths"], dtype=torch.int64),
                indices=torch.tensor(ids, dtype=torch.int64),
            )
        )
    return batches


def _run(ref: Reference, initial: nn.Module, *, dtype: torch.dtype, optimizer: str) -> Run:
    model = copy.deepcopy(initial).to(dtype)
    steps = training_steps(
        model,
        _official_batches(ref, dtype),
        _official_params(ref.opt, optimizer=optimizer),
        device="cpu",
        keep_grads=True,
    )
    return Run(model, steps)


@pytest.fixture(scope="module")
def adam_run(reference: Reference, initial_model: nn.Module) -> Run:
    return _run(reference, initial_model, dtype=torch.float32, optimizer="adam")


@pytest.fixture(scope="module")
def torch04_run(reference: Reference, initial_model: nn.Module) -> Run:
    return _run(reference, initial_model, dtype=torch.float32, optimizer="adam_torch04")


@pytest.fixture(scope="module")
def fp64_run(reference: Reference, initial_model: nn.Module) -> Run:
    return _run(reference, initial_model, dtype=torch.float64, optimizer="adam")


# ------------------------------------------------------------------------------------------- float32


def test_initial_weights_are_the_official_ones(reference: Reference, initial_model: nn.Module) -> None:
    state = _numpy_state(initial_model)
    init = reference.group("init")
    assert state.keys() == init.keys()
    for name, value in init.items():
        assert state[name].dtype == np.float32 and np.array_equal(state[name], value), name


def test_losses_and_gradient_norms_match(reference: Reference, adam_run: Run) -> None:
    arrays = reference.arrays
    loss = np.array([step.loss for step in adam_run.steps])
    norm = np.array([step.grad_norm for step in adam_run.steps])
    assert len(adam_run.steps) == len(reference.spec["batches"])
    print()
    _report("float32 loss, max relative", _max_rel(loss, arrays["loss"]), "rtol 1e-5")
    _report(
        "float32 grad norm before clip, max relative",
        _max_rel(norm, arrays["grad_norm_before_clip"]),
        "rtol 2e-5",
    )
    np.testing.assert_allclose(loss, arrays["loss"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(norm, arrays["grad_norm_before_clip"], rtol=2e-5, atol=0)
    np.testing.assert_allclose([step.lr for step in adam_run.steps], arrays["lr"], rtol=1e-12, atol=0)


def test_step1_gradients_match(reference: Reference, adam_run: Run) -> None:
    grads = adam_run.steps[0].grads
    assert grads is not None
    actual = {name: tensor.numpy() for name, tensor in grads.items()}
    expected = reference.group("grad_step1")
    print()
    _report("float32 step-1 gradients, max absolute", _max_abs(actual, expected), "atol 5e-5, rtol 1e-4")
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=5e-5, err_msg=name)


def test_weights_after_the_steps_match_torch_adam(reference: Reference, adam_run: Run) -> None:
    actual, expected = _numpy_state(adam_run.model), reference.group("final")
    print()
    _report(
        "float32 weights after the steps (torch Adam), max absolute", _max_abs(actual, expected), "atol 1e-6"
    )
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_weights_after_the_steps_match_torch04_adam(reference: Reference, torch04_run: Run) -> None:
    actual, expected = _numpy_state(torch04_run.model), reference.group("final_torch04adam")
    print()
    _report(
        "float32 weights after the steps (torch 0.4 Adam), max absolute",
        _max_abs(actual, expected),
        "atol 1e-6",
    )
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)
    losses = np.array([step.loss for step in torch04_run.steps])
    np.testing.assert_allclose(losses, reference.spec["loss_torch04_adam_formula"], rtol=1e-5, atol=0)
    # the two formulas really differ on this data: matching one is not matching the other
    assert _max_abs(actual, reference.group("final")) > 1e-6


def test_test_scores_and_metrics_after_the_steps(reference: Reference, adam_run: Run) -> None:
    rows = reference.tokens["test"]
    features = np.load(reference.root / "data" / "tiny_precomp" / "test_ims.npy").astype(np.float32)
    image_rows = [rows[i]["ims_row"] for i in range(0, len(rows), CAPTIONS_PER_IMAGE)]  # evalrank's de-dup
    token_ids, lengths = pad_tokens([torch.tensor(row["ids"], dtype=torch.int64) for row in rows])
    scores = encode_and_score(adam_run.model, torch.from_numpy(features[image_rows]), token_ids, lengths)
    expected = reference.arrays["test_sims_after_steps"]
    actual = scores.double().numpy()
    print()
    _report(
        "float32 test sims after the steps, max absolute",
        float(np.max(np.abs(actual - expected))),
        "rtol 1e-5, atol 1e-6",
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)

    metrics = retrieval_metrics(scores, CAPTIONS_PER_IMAGE)
    for direction in ("i2t", "t2i"):
        ours = [metrics[f"{direction}_{key}"] for key in ("r1", "r5", "r10", "medr", "meanr")]
        official = reference.arrays[f"test_{direction}_r_after_steps"]
        _report(
            f"{direction} [R@1, R@5, R@10, medr, meanr] {ours}, max absolute",
            float(np.max(np.abs(np.array(ours) - official))),
            "exact (1e-9)",
        )
        np.testing.assert_allclose(ours, official, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------- float64


def test_float64_steps_match_the_float64_reference(reference: Reference, fp64_run: Run) -> None:
    arrays = reference.arrays
    loss = np.array([step.loss for step in fp64_run.steps])
    norm = np.array([step.grad_norm for step in fp64_run.steps])
    grads = fp64_run.steps[0].grads
    assert grads is not None
    actual_grads = {name: tensor.numpy() for name, tensor in grads.items()}
    actual_final = _numpy_state(fp64_run.model)
    expected_grads = reference.group("grad_step1_fp64model")
    expected_final = reference.group("final_fp64model")
    print()
    _report("float64 loss, max relative", _max_rel(loss, arrays["loss_fp64model"]), "rtol 1e-9")
    _report(
        "float64 grad norm, max relative",
        _max_rel(norm, arrays["grad_norm_before_clip_fp64model"]),
        "rtol 1e-9",
    )
    _report("float64 step-1 gradients, max absolute", _max_abs(actual_grads, expected_grads), "atol 1e-10")
    _report(
        "float64 weights after the steps, max absolute", _max_abs(actual_final, expected_final), "atol 1e-10"
    )
    assert all(value.dtype == np.float64 for value in actual_final.values())
    np.testing.assert_allclose(loss, arrays["loss_fp64model"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(norm, arrays["grad_norm_before_clip_fp64model"], rtol=1e-9, atol=0)
    for name, value in expected_grads.items():
        np.testing.assert_allclose(actual_grads[name], value, rtol=0, atol=1e-10, err_msg=name)
    for name, value in expected_final.items():
        np.testing.assert_allclose(actual_final[name], value, rtol=0, atol=1e-10, err_msg=name)


# ------------------------------------------------------------------------------------------- the trainer

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


def _train(data: SyntheticDataset, params: TrainParams, out: Path, *, resume: bool = False) -> None:
    train(
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


def test_training_steps_replay_an_epoch_of_the_trainer_exactly(
    tiny_data: SyntheticDataset, tmp_path: Path
) -> None:
    params = TINY_PARAMS.model_copy(update={"epochs": 1})
    _train(tiny_data, params, tmp_path / "run")

    table = open_feature_table(tiny_data.features_dir, tiny_data.root / "cache")
    captions = read_captions(tiny_data.captions["train"])
    vocab = Vocabulary.load(tiny_data.vocab_path)
    rows = map_image_ids(table, captions.image_ids, captions_source="c", features_source="f")
    dataset = PairDataset(table, rows, tokenize_captions(captions.captions, vocab))
    sampler = EpochBatchSampler(len(dataset), params.batch_size, seed=params.seed)
    sampler.set_epoch(0)
    batches = [collate_pairs([dataset[i] for i in batch]) for batch in sampler]
    model = build_seeded_model(params, vocab_size=len(vocab), img_dim=table.feature_dim)
    steps = training_steps(model, batches, params)

    trained = load_model(tmp_path / "run/checkpoints/last").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert record["steps"] == len(steps)
    assert record["train_loss"] == pytest.approx(sum(step.loss for step in steps) / len(steps), rel=1e-12)


def test_resume_with_torch04_adam_ends_with_identical_weights(
    tiny_data: SyntheticDataset, tmp_path: Path
) -> None:
    params = TINY_PARAMS.model_copy(update={"optimizer": "adam_torch04"})
    _train(tiny_data, params, tmp_path / "straight")
    _train(tiny_data, params.model_copy(update={"epochs": 1}), tmp_path / "split")
    _train(tiny_data, params, tmp_path / "split", resume=True)

    straight_dir, split_dir = tmp_path / "straight/checkpoints/last", tmp_path / "split/checkpoints/last"
    meta = read_checkpoint_info(split_dir).optimizer_meta
    assert meta is not None and meta["class"] == "LegacyAdam"
    steps_per_epoch = 40 * 5 // params.batch_size  # the tiny split: 40 images, 5 captions each
    assert {scalars["step"] for scalars in meta["state_scalars"].values()} == {2 * steps_per_epoch}
    straight, split = load_model(straight_dir).state_dict(), load_model(split_dir).state_dict()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    assert (straight_dir / OPTIMIZER_FILE).read_bytes() == (split_dir / OPTIMIZER_FILE).read_bytes()

    with pytest.raises(TrainingError, match="optimizer"):  # the other update cannot continue this run
        _train(tiny_data, TINY_PARAMS.model_copy(update={"epochs": 3}), tmp_path / "split", resume=True)
