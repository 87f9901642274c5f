"""CUDA against CPU: what only a GPU can check (run by `bash benchmarks/gpu_check.sh`, part cuda-tests).

Every test is marked `cuda` and skipped with a reason where there is no CUDA device. TF32 is switched off in
these tests, so CUDA and CPU both multiply in float32 and the tolerances below only absorb summation order
(cuDNN and oneDNN pick different algorithms): boxes within 0.05 px, region features within 1e-3 absolute +
1e-3 relative for the 101-layer detector and 1e-4 / 1e-3 for the tiny one, scores within 1e-5.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors.bua.precision import fp32_matmul_precision
from pipeline.models.xattn import xattn_scores

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

FIXTURE_IMAGES = ("landscape_500x375", "portrait_333x502", "wide_900x240")
BOX_ATOL = 0.05  # px
FULL_FEATURES = {"atol": 1e-3, "rtol": 1e-3}
TINY_FEATURES = {"atol": 1e-4, "rtol": 1e-3}


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """float32 products on the GPU, as on the CPU (restored afterwards)."""
    with fp32_matmul_precision("ieee"):  # torch's new precision API only (never the legacy flags)
        yield


def _scenes(count: int, seed: int) -> list[np.ndarray]:
    """BGR scenes of different sizes (rectangles on noise), so a batch needs padding."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 180 + 40 * index, 260 - 20 * index
        image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        for _ in range(5):
            y, x = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
            h, w = int(rng.integers(10, height // 2)), int(rng.integers(10, width // 2))
            image[y : y + h, x : x + w] = rng.integers(60, 256, size=3)
        images.append(image)
    return images


def _assert_same_regions(cuda_runs: list, cpu_runs: list, features: dict[str, float]) -> None:
    assert len(cuda_runs) == len(cpu_runs)
    for index, (gpu, cpu) in enumerate(zip(cuda_runs, cpu_runs, strict=True)):
        message = f"image {index}"
        assert gpu.num_boxes == cpu.num_boxes, message
        assert (gpu.image_w, gpu.image_h) == (cpu.image_w, cpu.image_h), message
        np.testing.assert_allclose(gpu.boxes, cpu.boxes, atol=BOX_ATOL, rtol=0, err_msg=message)
        np.testing.assert_allclose(gpu.features, cpu.features, **features, err_msg=message)
        np.testing.assert_array_equal(gpu.object_ids, cpu.object_ids, err_msg=message)
        np.testing.assert_allclose(gpu.object_conf, cpu.object_conf, atol=1e-4, err_msg=message)


# ---- detector --------------------------------------------------------------------------------------------
def test_full_detector_exact_on_cuda_matches_cpu_on_the_fixture_images(bua_fixtures: Path) -> None:
    """The recipe weights on the three fixture JPEGs: one image alone and two in a padded batch."""
    from bua_recipe import recipe_weights

    from extractors.bua.config import DetectorConfig
    from extractors.bua.detector import BottomUpAttentionDetector
    from extractors.bua.weights import load_into

    detector = BottomUpAttentionDetector(DetectorConfig())
    load_into(detector, recipe_weights(str(bua_fixtures / "weights_manifest.json")))
    images = [cv2.imread(str(bua_fixtures / f"{name}.jpg")) for name in FIXTURE_IMAGES]
    cpu = detector.detect(images[:1]) + detector.detect(images[1:])
    on_cuda = copy.deepcopy(detector).to("cuda")
    gpu = on_cuda.detect(images[:1]) + on_cuda.detect(images[1:])
    _assert_same_regions(gpu, cpu, FULL_FEATURES)


def test_tiny_detector_exact_on_cuda_matches_cpu() -> None:
    from extractors.bua.factory import build_detector

    detector = build_detector("random", arch="tiny", seed=0).detector
    images = _scenes(4, seed=3)
    cpu = detector.detect(images[:2]) + detector.detect(images[2:])
    on_cuda = copy.deepcopy(detector).to("cuda")
    gpu = on_cuda.detect(images[:2]) + on_cuda.detect(images[2:])
    _assert_same_regions(gpu, cpu, TINY_FEATURES)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_tiny_detector_fast_modes_run_on_cuda(precision: str) -> None:
    """The fast modes give the same number of regions of the same width, all finite (not equal: faster)."""
    from extractors.bua.factory import build_detector

    built = build_detector("random", arch="tiny", seed=0)
    detector = built.detector.to("cuda")
    images = _scenes(3, seed=4)
    exact = detector.detect(images, precision="exact")
    fast = detector.detect(images, precision=precision)
    for reference, run in zip(exact, fast, strict=True):
        assert run.num_boxes == reference.num_boxes
        assert run.features.shape == reference.features.shape
        assert np.isfinite(run.features).all() and np.isfinite(run.boxes).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fast_modes_keep_the_exact_proposals_on_cuda(precision: str) -> None:
    """Backbone and RPN stay float32 in the fast modes: the proposals equal exact's bit for bit."""
    from extractors.bua.factory import build_detector

    detector = build_detector("random", arch="tiny", seed=0).detector.to("cuda")
    images = _scenes(3, seed=5)
    exact = detector.trace(images)
    fast = detector.trace(images, precision=precision)
    for a, b in zip(exact, fast, strict=True):
        assert torch.equal(a.proposals.boxes, b.proposals.boxes)


def test_detect_synchronises_per_batch_not_per_image() -> None:
    """Host syncs in `detect` (NMS convergence checks, the one result copy) must not grow with the images."""
    import warnings

    from extractors.bua.factory import build_detector

    detector = build_detector("random", arch="tiny", seed=0).detector.to("cuda")
    images = _scenes(8, seed=6)
    detector.detect(images)  # warm-up: cuDNN autotuning, allocator

    def syncs(count: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                detector.detect(images[:count], nms="device")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return len(caught)

    two, eight = syncs(2), syncs(8)
    # Per-image syncs would add several per extra image (36+ here); convergence checks may add a few.
    assert eight <= two + 4, (two, eight)


# ---- NMS -------------------------------------------------------------------------------------------------
def _nms_api() -> tuple[Any, Any]:
    """extractors/bua/nms.py's two functions; skip (not fail) while that module is being written."""
    try:
        import extractors.bua.nms as nms
    except ImportError as exc:
        pytest.skip(f"extractors.bua.nms not importable yet: {exc}")
    if not (hasattr(nms, "nms_padded") and hasattr(nms, "greedy_nms")):
        pytest.skip("extractors.bua.nms has no nms_padded / greedy_nms yet")
    return nms.nms_padded, nms.greedy_nms


def _clustered_boxes(batch: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes around a few centres (many overlaps) and distinct scores (no ties to break)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 8, 2, generator=generator) * 400 + 50
    pick = torch.randint(0, 8, (batch, count), generator=generator)
    centre = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2))
    centre = centre + torch.randn(batch, count, 2, generator=generator) * 15
    size = torch.rand(batch, count, 2, generator=generator) * 80 + 10
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=2)
    scores = torch.stack([torch.randperm(count, generator=generator) for _ in range(batch)]).float() / count
    return boxes, scores


@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_device_nms_matches_cpu_nms(thresh: float) -> None:
    nms_padded, greedy_nms = _nms_api()
    boxes, scores = _clustered_boxes(4, 300, seed=int(thresh * 10))
    counts = torch.tensor([300, 211, 57, 1])
    max_keep = 100
    keep_cpu, kept_cpu = nms_padded(boxes, scores, counts, thresh, max_keep)
    keep_gpu, kept_gpu = nms_padded(boxes.cuda(), scores.cuda(), counts.cuda(), thresh, max_keep)
    assert keep_gpu.is_cuda
    assert torch.equal(kept_gpu.cpu(), kept_cpu)
    for row, (n, kept) in enumerate(zip(counts.tolist(), kept_cpu.tolist(), strict=True)):
        assert torch.equal(keep_gpu[row, :kept].cpu(), keep_cpu[row, :kept]), f"row {row}"
        greedy_cpu = torch.as_tensor(greedy_nms(boxes[row, :n], scores[row, :n], thresh, max_keep=max_keep))
        greedy_gpu = torch.as_tensor(
            greedy_nms(boxes[row, :n].cuda(), scores[row, :n].cuda(), thresh, max_keep=max_keep)
        )
        assert torch.equal(greedy_gpu.cpu(), greedy_cpu), f"row {row}: greedy_nms CUDA vs CPU"
        assert sorted(greedy_cpu.tolist()) == sorted(keep_cpu[row, :kept].tolist()), f"row {row}"


# ---- SCAN scoring ----------------------------------------------------------------------------------------
def _embeddings(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(23, 9, 32, generator=generator, dtype=dtype), dim=-1)
    captions = F.normalize(torch.randn(37, 7, 32, generator=generator, dtype=dtype), dim=-1)
    caption_lengths = torch.randint(1, 8, (37,), generator=generator)
    region_lengths = torch.randint(3, 10, (23,), generator=generator)
    captions = captions * (torch.arange(7)[None, :] < caption_lengths[:, None])[..., None]
    images = images * (torch.arange(9)[None, :] < region_lengths[:, None])[..., None]
    return images, captions, caption_lengths, region_lengths


@pytest.mark.parametrize(
    ("direction", "norm", "agg"),
    [
        ("t2i", "clipped_l2norm", "LogSumExp"),
        ("t2i", "softmax", "Mean"),
        ("i2t", "clipped_l2norm", "Mean"),
        ("i2t", "l2norm", "Max"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xattn_scores_on_cuda_match_cpu(direction: str, norm: str, agg: str, dtype: torch.dtype) -> None:
    images, captions, caption_lengths, region_lengths = _embeddings(1, dtype)
    options = dict(direction=direction, raw_feature_norm=norm, agg=agg, lambda_softmax=9.0, lambda_lse=6.0)
    cpu = xattn_scores(images, captions, caption_lengths, region_lengths=region_lengths, **options)
    gpu = xattn_scores(
        images.cuda(),
        captions.cuda(),
        caption_lengths.cuda(),
        region_lengths=region_lengths.cuda(),
        block_size=(8, 16),  # several blocks, uneven edges
        **options,
    )
    assert gpu.is_cuda and gpu.dtype == cpu.dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gpu.cpu(), cpu, atol=atol, rtol=0)


def test_scan_model_scores_on_cuda_match_cpu() -> None:
    """Encoders (the GRU through cuDNN) and scoring of a small SCAN, CUDA against CPU."""
    from pipeline.models.build import create_model

    torch.manual_seed(0)
    model = create_model("scan_t2i_lse", vocab_size=40, img_dim=24, embed_size=16, word_dim=8).eval()
    images, _, _, region_lengths = _embeddings(2, torch.float32)
    regions = torch.randn(images.shape[0], images.shape[1], 24)
    tokens = torch.randint(1, 40, (11, 6))
    lengths = torch.tensor([6, 5, 5, 4, 6, 3, 2, 6, 1, 4, 5])
    tokens = tokens * (torch.arange(6)[None, :] < lengths[:, None])
    with torch.inference_mode():
        cpu = model.similarity(
            model.encode_images(regions, region_lengths),
            model.encode_captions(tokens, lengths),
            lengths,
            region_lengths,
        )
        on_cuda = copy.deepcopy(model).cuda()
        gpu = on_cuda.similarity(
            on_cuda.encode_images(regions.cuda(), region_lengths.cuda()),
            on_cuda.encode_captions(tokens.cuda(), lengths.cuda()),
            lengths.cuda(),
            region_lengths.cuda(),
        )
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


# ---- training --------------------------------------------------------------------------------------------
def _training_batch() -> Any:
    from pipeline.loaders import PairBatch

    generator = torch.Generator().manual_seed(7)
    region_lengths = torch.tensor([6, 4, 6, 5, 3, 6, 6, 2])
    caption_lengths = torch.tensor([5, 7, 3, 7, 6, 2, 4, 7])
    regions = (
        torch.randn(8, 6, 24, generator=generator) * (torch.arange(6) < region_lengths[:, None])[..., None]
    )
    tokens = torch.randint(1, 40, (8, 7), generator=generator) * (torch.arange(7) < caption_lengths[:, None])
    return PairBatch(regions, region_lengths, tokens, caption_lengths, torch.arange(8))


def _small_scan(seed: int = 0) -> torch.nn.Module:
    from pipeline.models.build import create_model

    torch.manual_seed(seed)
    return create_model("scan_t2i_avg", vocab_size=40, img_dim=24, embed_size=16, word_dim=8)


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_one_amp_training_step_on_cuda_is_finite(amp_dtype: str) -> None:
    from pipeline.params import TrainParams
    from pipeline.train import training_steps

    params = TrainParams(model="scan_t2i_avg", batch_size=8, amp=True, amp_dtype=amp_dtype)
    model = _small_scan()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    (step,) = training_steps(model, [_training_batch()], params, device="cuda", keep_grads=True)
    assert np.isfinite(step.loss) and step.loss > 0
    assert step.grads is not None and step.grads
    assert all(grad.is_cuda for grad in step.grads.values())
    weights = dict(model.named_parameters())
    assert all(bool(torch.isfinite(p).all()) for p in weights.values())
    if amp_dtype == "bf16":  # no loss scaling: the gradients are the step's, finite, and the step moved
        assert np.isfinite(step.grad_norm) and step.grad_norm > 0
        assert all(bool(torch.isfinite(grad).all()) for grad in step.grads.values())
        assert any(not torch.equal(before[n], weights[n].detach().cpu()) for n in before)


def test_float32_training_step_on_cuda_matches_cpu() -> None:
    from pipeline.params import TrainParams
    from pipeline.train import training_steps

    params = TrainParams(model="scan_t2i_avg", batch_size=8, amp=False, lr=0.5)  # the SGD's lr
    cpu_model, gpu_model = _small_scan(), _small_scan().cuda()
    # SGD, not Adam: Adam's first step is lr * sign(gradient), which turns float noise in a near-zero
    # gradient into a full-size difference; SGD keeps weight differences proportional to gradient ones.
    steps = {}
    for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        optimizer = torch.optim.SGD(model.parameters(), lr=params.lr)
        (steps[device],) = training_steps(
            model, [_training_batch()], params, device=device, optimizer=optimizer
        )
    cpu_step, gpu_step = steps["cpu"], steps["cuda"]
    assert gpu_step.loss == pytest.approx(cpu_step.loss, rel=1e-5)
    assert gpu_step.grad_norm == pytest.approx(cpu_step.grad_norm, rel=1e-4)
    gpu_weights = gpu_model.state_dict()
    for name, expected in cpu_model.state_dict().items():
        torch.testing.assert_close(gpu_weights[name].cpu(), expected, atol=1e-5, rtol=0, msg=name)


# ---- the extraction CLI ----------------------------------------------------------------------------------
def test_extract_cli_on_cuda_matches_cpu(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.store import FeatureStore
    from stages.cli import app

    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(_scenes(4, seed=9)):
        cv2.imwrite(str(images / f"img_{index}.png"), image)
    common = ["--images", str(images), "--arch", "tiny", "--weights", "random", "--seed", "7"]
    common += ["--batch-size", "2", "--feature-dtype", "float32", "--num-workers", "0"]
    records = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        result = CliRunner().invoke(app, ["extract", *common, "--out", str(out), "--device", device])
        assert result.exit_code == 0, result.output
        assert "images/s" in result.output
        records[device] = {r.image_id: r for r in FeatureStore(out).iter_records()}
    assert sorted(records["cuda"]) == sorted(records["cpu"]) == [f"img_{i}.png" for i in range(4)]
    for image_id, gpu in records["cuda"].items():
        cpu = records["cpu"][image_id]
        np.testing.assert_allclose(gpu.boxes, cpu.boxes, atol=BOX_ATOL, rtol=0, err_msg=image_id)
        np.testing.assert_allclose(
            np.asarray(gpu.features, np.float32), np.asarray(cpu.features, np.float32), **TINY_FEATURES
        )
        np.testing.assert_array_equal(gpu.object_ids, cpu.object_ids)
