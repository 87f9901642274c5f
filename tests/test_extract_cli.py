"""`scan-pipe extract` end to end on the tiny detector: store, metadata, summary, resume (after SIGKILL),
sharded torchrun run, bad and unusual input, box modes, feature dtypes, and the user-facing errors."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from extractors.bua.factory import detector_config
from extractors.bua.weights import WEIGHTS_NOT_GIVEN_MESSAGE
from pipeline.image_files import list_images
from pipeline.params import ExtractParams
from pipeline.store import FeatureStore, list_parts
from stages.cli import app
from stages.extract import EXIT_IMAGES_FAILED, load_detector

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 10
ROWS_PER_PART = 2
# Options shared by every run that is compared with the reference run.
TINY = ["--arch", "tiny", "--weights", "random", "--seed", "7", "--batch-size", "1"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    return env


def _jpeg(array: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _scene(seed: int, height: int, width: int) -> np.ndarray:
    """A few coloured rectangles on a noisy background: gives the detector something to respond to."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y, x = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 12))
        image[y : y + int(rng.integers(8, height // 2)), x : x + int(rng.integers(8, width // 2))] = (
            rng.integers(60, 256, size=3)
        )
    return image


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _run(*args: str | Path) -> object:
    result = CliRunner().invoke(app, ["extract", *[str(a) for a in args]])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _records(out: Path) -> dict[str, object]:
    return {record.image_id: record for record in FeatureStore(out).iter_records()}


def _assert_same_rows(
    actual: Path, expected: Path, image_ids: list[str] | None = None, atol: float = 1e-5
) -> None:
    got, want = _records(actual), _records(expected)
    ids = sorted(want) if image_ids is None else sorted(image_ids)
    assert sorted(got) == ids
    for image_id in ids:
        a, b = got[image_id], want[image_id]
        assert (a.image_w, a.image_h) == (b.image_w, b.image_h)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3, err_msg=image_id)
        np.testing.assert_allclose(
            np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=atol, rtol=1e-4
        )
        np.testing.assert_array_equal(a.object_ids, b.object_ids)


def _no_leftovers(out: Path) -> None:
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temporary files left in {out}: {hidden}"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for index in range(NUM_IMAGES):
        height, width = 56 + 6 * index, 88 - 3 * index
        folder = root / ("sub" if index % 3 == 0 else "") / ("déjà" if index == 4 else "")
        suffix = ".PNG" if index == 5 else ".jpg"
        image = _scene(index, height, width)
        data = _png(Image.fromarray(image)) if suffix == ".PNG" else _jpeg(image)
        _write(folder / f"img_{index:02d}{suffix}", data)
    _write(root / "readme.txt", b"not listed: wrong suffix")
    return root


@pytest.fixture(scope="module")
def reference(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One uninterrupted single-process run, float32 features: the yardstick of the other runs."""
    out = tmp_path_factory.mktemp("reference") / "store"
    result = _run(
        "--images",
        image_dir,
        "--out",
        out,
        *TINY,
        "--rows-per-part",
        ROWS_PER_PART,
        "--feature-dtype",
        "float32",
        "--num-workers",
        "2",
    )
    return out, result


# -------------------------------------------------------------------------------------------- happy path


def test_happy_path_store_metadata_and_summary(image_dir: Path, reference: tuple[Path, object]) -> None:
    out, result = reference
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert sorted(store.image_ids) == list_images(image_dir)
    assert "déjà/img_04.jpg" in store.image_ids and "img_05.PNG" in store.image_ids
    assert len(store.parts) == NUM_IMAGES // ROWS_PER_PART
    meta = store.metadata
    assert meta["untrained"] is True and meta["weights"] == "random" and meta["weights_seed"] == 7
    assert len(meta["weights_sha256"]) == 64
    assert meta["precision"] == "exact" and meta["feature_dtype"] == "float32"
    assert meta["arch"] == "tiny" and meta["detector_config"]["box_mode"] == "fixed"
    assert meta["package_version"] and meta["extractor"] == "bottom-up-attention"
    assert store.feature_dim == detector_config("tiny").feature_dim
    for record in store.iter_records():
        assert record.num_boxes == 36 and record.features.dtype == np.float32
        assert np.isfinite(record.features).all()
        assert (record.boxes[:, 2] <= record.image_w).all() and (record.boxes[:, 3] <= record.image_h).all()
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["total"], summary["done"], summary["skipped"], summary["failed"]) == (
        NUM_IMAGES,
        NUM_IMAGES,
        0,
        0,
    )
    assert summary["images_per_s"] > 0 and summary["untrained"] is True
    assert summary["weights_sha256"] == meta["weights_sha256"]
    assert (out / "_errors.jsonl").read_text() == ""
    assert "extract summary" in result.output and "untrained detector" in result.output
    assert "images/s" in result.output
    _no_leftovers(out)


def test_rerun_skips_everything(image_dir: Path, reference: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = reference
    parts_before = list_parts(out)
    result = _run(
        "--images",
        image_dir,
        "--out",
        out,
        *TINY,
        "--rows-per-part",
        ROWS_PER_PART,
        "--feature-dtype",
        "float32",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, NUM_IMAGES, 0)
    assert list_parts(out) == parts_before


def test_same_seed_same_weights_other_seed_differs() -> None:
    first = load_detector(ExtractParams(arch="tiny", weights="random", seed=1))
    again = load_detector(ExtractParams(arch="tiny", weights="random", seed=1))
    other = load_detector(ExtractParams(arch="tiny", weights="random", seed=2))
    assert (
        first.metadata["weights_sha256"]
        == again.metadata["weights_sha256"]
        != other.metadata["weights_sha256"]
    )


def test_list_file_input(image_dir: Path, reference: tuple[Path, object], tmp_path: Path) -> None:
    wanted = ["sub/img_03.jpg", "img_01.jpg", "déjà/img_04.jpg"]
    list_file = _write(tmp_path / "images.txt", ("\n".join([*wanted, "missing/nope.jpg"]) + "\n").encode())
    out = tmp_path / "store"
    result = _run(
        "--images",
        image_dir,
        "--out",
        out,
        "--list",
        list_file,
        *TINY,
        "--feature-dtype",
        "float32",
        "--num-workers",
        "0",
    )
    assert result.exit_code == EXIT_IMAGES_FAILED, result.output
    _assert_same_rows(out, reference[0], wanted)
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert errors == [
        {
            "image_id": "missing/nope.jpg",
            "error_type": "not_found",
            "reason": "file not found",
            "exception": "ImageDecodeError",
        }
    ]


# ------------------------------------------------------------------------------------------ user errors


def test_missing_weights_says_where_published_weights_are(image_dir: Path, tmp_path: Path) -> None:
    result = _run("--images", image_dir, "--out", tmp_path / "out", "--arch", "tiny")
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert " ".join(WEIGHTS_NOT_GIVEN_MESSAGE.split()) in output
    assert "unc-nlp/frcnn-vg-finetuned" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_weights_file_not_found(image_dir: Path, tmp_path: Path) -> None:
    result = _run(
        "--images", image_dir, "--out", tmp_path / "out", "--arch", "tiny", "--weights", tmp_path / "w.bin"
    )
    assert result.exit_code == 2
    assert "w.bin: weights file not found" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--boxes", "50"], "--boxes"),
        (["--batch-size", "0"], "--batch-size"),
        (["--precision", "int8"], "--precision"),
    ],
)
def test_invalid_options_name_themselves(
    image_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = _run("--images", image_dir, "--out", tmp_path / "out", *TINY, *args)
    assert result.exit_code == 2 and message in result.output


def test_params_file_errors(image_dir: Path, tmp_path: Path) -> None:
    params = _write(tmp_path / "params.yaml", yaml.safe_dump({"extract": {"weigths": "random"}}).encode())
    result = _run("--images", image_dir, "--out", tmp_path / "out", "--params", params)
    assert result.exit_code == 2 and "extract.weigths" in result.output


def test_images_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _run("--images", tmp_path / "empty", "--out", tmp_path / "out", *TINY)
    assert result.exit_code == 2 and "no .jpg/.jpeg/.png images found" in result.output


# ------------------------------------------------------------------------------------- dtype, box modes


def test_float16_from_params_and_mixing_refused(
    image_dir: Path, reference: tuple[Path, object], tmp_path: Path
) -> None:
    params = _write(
        tmp_path / "params.yaml",
        yaml.safe_dump(
            {"extract": {"weights": "random", "arch": "tiny", "seed": 7, "num_workers": 0}}
        ).encode(),
    )
    wanted = ["img_01.jpg", "img_02.jpg"]
    list_file = _write(tmp_path / "images.txt", "\n".join(wanted).encode())
    out = tmp_path / "store16"
    result = _run("--images", image_dir, "--out", out, "--list", list_file, "--params", params)
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert store.feature_dtype == "float16" and store.metadata["feature_dtype"] == "float16"
    half = _records(out)
    full = _records(reference[0])
    for image_id in wanted:
        assert half[image_id].features.dtype == np.float16
        np.testing.assert_allclose(
            half[image_id].features.astype(np.float32), full[image_id].features, rtol=2e-3, atol=1e-3
        )
    # Resuming the float16 store with float32 (or other weights) would mix two feature sets: refused.
    for extra, words in (
        (["--feature-dtype", "float32"], "feature_dtype"),
        (["--seed", "8"], "weights_sha256"),
    ):
        result = _run("--images", image_dir, "--out", out, "--params", params, *extra)
        assert result.exit_code == 2 and words in result.output and "already holds features" in result.output


def test_adaptive_boxes_between_10_and_100(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adaptive"
    result = _run(
        "--images",
        image_dir,
        "--out",
        out,
        *TINY,
        "--boxes",
        "adaptive",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--post-nms-top-n",
        "120",
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert store.metadata["detector_config"]["box_mode"] == "adaptive"
    counts = [record.num_boxes for record in store.iter_records()]
    assert len(counts) == NUM_IMAGES and all(10 <= n <= 100 for n in counts), counts


# ------------------------------------------------------------------------------------------ bad input


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_input_recorded_and_run_goes_on_then_retried(tmp_path: Path) -> None:
    images = tmp_path / "images"
    good = _jpeg(_scene(1, 60, 80))
    good_png = _png(Image.fromarray(_scene(2, 60, 80)))
    _write(images / "good_a.jpg", good)
    _write(images / "good_b.png", good_png)
    bad = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "truncated.png": (good_png[:-30], "truncated"),
        "text.jpg": (b"just some text pretending to be an image\n", "not_image"),
        "gif.png": (b"GIF89a" + bytes(64), "unsupported"),
        "bomb.png": (_bomb_png(30_000, 30_000), "too_large"),
        "sliver.png": (_png(Image.fromarray(_scene(3, 2000, 20)[:2000, :3])), "unsupported"),
    }
    for name, (data, _) in bad.items():
        _write(images / name, data)
    out = tmp_path / "out"
    result = _run("--images", images, "--out", out, *TINY, "--num-workers", "2", "--batch-size", "2")
    assert result.exit_code == EXIT_IMAGES_FAILED, result.output
    assert sorted(FeatureStore(out).image_ids) == ["good_a.jpg", "good_b.png"]
    errors = {e["image_id"]: e for e in map(json.loads, (out / "_errors.jsonl").read_text().splitlines())}
    assert {name: e["error_type"] for name, e in errors.items()} == {
        name: kind for name, (_, kind) in bad.items()
    }
    assert all(e["reason"] for e in errors.values())
    assert "30000x30000" in errors["bomb.png"]["reason"]
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (2, len(bad))
    assert f"{len(bad)} image(s) failed" in result.output

    # A rerun retries the failures (they are not in the store); --max-failures decides the exit code.
    _write(images / "truncated.jpg", good)  # repaired meanwhile
    result = _run("--images", images, "--out", out, *TINY, "--num-workers", "0", "--max-failures", len(bad))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 2, len(bad) - 1)
    assert "truncated.jpg" in FeatureStore(out).image_ids
    assert "truncated.jpg" not in (out / "_errors.jsonl").read_text()

    # The pixel limit is configurable.
    result = _run(
        "--images",
        images,
        "--out",
        tmp_path / "limited",
        *TINY,
        "--num-workers",
        "0",
        "--max-image-pixels",
        1000,
        "--max-failures",
        100,
    )
    assert result.exit_code == 0
    assert "too_large" in (tmp_path / "limited" / "_errors.jsonl").read_text()
    assert not list_parts(tmp_path / "limited") or len(FeatureStore(tmp_path / "limited")) == 0


def test_unusual_valid_images_are_extracted_like_cv2_imread(tmp_path: Path) -> None:
    images = tmp_path / "images"
    rgb = _scene(5, 64, 80)
    samples16 = (rgb.astype(np.uint16) * 257 + np.arange(80, dtype=np.uint16)[None, :, None]).astype(
        np.uint16
    )
    ok, deep = cv2.imencode(".png", samples16[:, :, ::-1])
    assert ok
    files = {
        "gray.jpg": _jpeg(np.asarray(Image.fromarray(rgb).convert("L"))),
        "gray.png": _png(Image.fromarray(rgb).convert("L")),
        "cmyk.jpg": (lambda b: (Image.fromarray(rgb).convert("CMYK").save(b, "JPEG"), b.getvalue())[1])(
            io.BytesIO()
        ),
        "deep16.png": deep.tobytes(),
        "palette.png": _png(Image.fromarray(rgb).convert("P")),
        "rgba.png": _png(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 5, np.uint8)]), "RGBA")),
        "gray_alpha.png": _png(Image.fromarray(rgb).convert("LA")),
    }
    for name, data in files.items():
        _write(images / name, data)
    out = tmp_path / "out"
    result = _run("--images", images, "--out", out, *TINY, "--feature-dtype", "float32", "--num-workers", "2")
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert sorted(records) == sorted(files)
    conversions = json.loads((out / "_summary.json").read_text())["conversions"]
    for words in ("grayscale replicated", "CMYK", "16-bit to 8-bit", "palette expanded", "alpha dropped"):
        assert any(words in key or words.replace("CMYK", "YCCK") in key for key in conversions), (
            words,
            conversions,
        )
    # End to end, each stored row is what the detector gives on cv2.imread's array.
    params = ExtractParams(arch="tiny", weights="random", seed=7)
    detector = load_detector(params).detector
    for name in files:
        expected = detector.detect([cv2.imread(str(images / name), cv2.IMREAD_COLOR)])[0]
        np.testing.assert_allclose(
            records[name].features, expected.features, atol=1e-5, rtol=1e-4, err_msg=name
        )
        assert (records[name].image_w, records[name].image_h) == (80, 64)


# --------------------------------------------------------------------------------- kill, resume, shards


def _extract_command(image_dir: Path, out: Path, *, num_workers: int) -> list[str]:
    """`scan-pipe extract` of the tiny detector as a child process (float32 rows, small parts)."""
    return [
        sys.executable,
        "-m",
        "stages.cli",
        "extract",
        "--images",
        str(image_dir),
        "--out",
        str(out),
        *TINY,
        "--rows-per-part",
        str(ROWS_PER_PART),
        "--feature-dtype",
        "float32",
        "--num-workers",
        str(num_workers),
    ]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_rows(
    image_dir: Path, reference: tuple[Path, object], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    command = _extract_command(image_dir, out, num_workers=2)
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the loader workers die with it
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (out.is_dir() and list_parts(out)) and process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed; the test needs a slower run"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    partial = FeatureStore(out)
    assert 0 < len(partial) < NUM_IMAGES
    assert len(partial) % ROWS_PER_PART == 0  # whole parts only

    result = _run(
        "--images",
        image_dir,
        "--out",
        out,
        *TINY,
        "--rows-per-part",
        ROWS_PER_PART,
        "--feature-dtype",
        "float32",
        "--num-workers",
        "0",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped"] == len(partial) and summary["done"] == NUM_IMAGES - len(partial)
    _assert_same_rows(out, reference[0])
    _no_leftovers(out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_ranks_equal_a_single_process_run(
    image_dir: Path, reference: tuple[Path, object], tmp_path: Path
) -> None:
    """Two ranks started with the environment `torchrun --nproc-per-node 2` gives them (the launcher itself
    would only add another interpreter start-up to the test), joined through env:// with gloo."""
    out = tmp_path / "sharded"
    command = _extract_command(image_dir, out, num_workers=0)
    port = _free_port()
    processes = []
    for rank in range(2):
        env = _child_env()
        env.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        processes.append(
            subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        finally:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)
    shards = {path.name.split("-")[1] for path in list_parts(out)}
    assert shards == {"0", "1"}
    _assert_same_rows(out, reference[0])
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["done"] == NUM_IMAGES and summary["failed"] == 0
    assert sorted(rank["rank"] for rank in summary["ranks"]) == [0, 1]
    assert all(rank["done"] == NUM_IMAGES // 2 for rank in summary["ranks"])
    assert outputs[0].count("extract summary") == 1 and "extract summary" not in outputs[1]  # rank 0 reports
    _no_leftovers(out)


def test_vocabulary_names_recorded_and_checked(image_dir: Path, tmp_path: Path) -> None:
    config = detector_config("tiny")
    objects = _write(
        tmp_path / "objects.txt", "\n".join(f"thing{i},synonym" for i in range(config.num_classes)).encode()
    )
    attributes = _write(
        tmp_path / "attributes.txt", "\n".join(f"attr{i}" for i in range(config.num_attributes)).encode()
    )
    list_file = _write(tmp_path / "images.txt", b"img_01.jpg\n")
    out = tmp_path / "named"
    common = ["--images", image_dir, "--list", list_file, *TINY, "--num-workers", "0"]
    result = _run(*common, "--out", out, "--objects-vocab", objects, "--attributes-vocab", attributes)
    assert result.exit_code == 0, result.output
    metadata = FeatureStore(out).metadata
    assert (
        metadata["object_names"][3] == "thing3,synonym"
        and len(metadata["attribute_names"]) == config.num_attributes
    )
    short = _write(tmp_path / "short.txt", b"only\ntwo\n")
    result = _run(*common, "--out", tmp_path / "bad", "--objects-vocab", short)
    assert result.exit_code == 2
    assert "short.txt: 2 object names, but the detector has" in " ".join(result.output.split())


def test_fast_precision_mode_recorded(image_dir: Path, tmp_path: Path) -> None:
    list_file = _write(tmp_path / "images.txt", b"img_01.jpg\nimg_02.jpg\n")
    out = tmp_path / "bf16"
    result = _run(
        "--images",
        image_dir,
        "--list",
        list_file,
        "--out",
        out,
        *TINY,
        "--precision",
        "bf16",
        "--num-workers",
        "0",
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert store.metadata["precision"] == "bf16" and len(store) == 2
    assert json.loads((out / "_summary.json").read_text())["precision"] == "bf16"


def test_set_assignments_and_device_auto(image_dir: Path, tmp_path: Path) -> None:
    list_file = _write(tmp_path / "images.txt", b"img_01.jpg\nimg_02.jpg\n")
    out = tmp_path / "set"
    common = ["--images", image_dir, "--list", list_file, *TINY, "--num-workers", "0"]
    result = _run(*common, "--out", out, "--set", "rows_per_part=1", "--set", "extract.device=auto")
    assert result.exit_code == 0, result.output
    assert len(list_parts(out)) == 2
    assert json.loads((out / "_summary.json").read_text())["device"] in ("cpu", "cuda:0")
    result = _run(*common, "--out", tmp_path / "bad", "--set", "rows_per_prt=1")
    assert result.exit_code == 2 and "rows_per_prt" in result.output


# ----------------------------------------------------------------------------- EXIF, missing end marker


def _oriented_jpeg(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(array, exif=exif.tobytes())


def test_exif_orientation_ignored_by_default_applied_on_request(tmp_path: Path) -> None:
    from pipeline.extraction import ERRORS_FILE, SUMMARY_FILE

    images = tmp_path / "images"
    scene = _scene(11, 64, 96)
    _write(images / "rotated.jpg", _oriented_jpeg(scene, 6))  # displayed rotated 90 degrees clockwise
    _write(images / "flipped.jpg", _oriented_jpeg(scene, 3))  # displayed upside down: same size
    _write(images / "plain.jpg", _jpeg(scene))
    common = [*TINY, "--feature-dtype", "float32", "--num-workers", "0"]
    ignored, applied = tmp_path / "ignore", tmp_path / "apply"
    assert _run("--images", images, "--out", ignored, *common).exit_code == 0
    result = _run("--images", images, "--out", applied, *common, "--exif", "apply")
    assert result.exit_code == 0, result.output
    kept, turned = _records(ignored), _records(applied)

    # ignore: the stored pixels, as OpenCV 2.4 (the Caffe reference) read them.
    for name in ("rotated.jpg", "flipped.jpg", "plain.jpg"):
        assert (kept[name].image_w, kept[name].image_h) == (96, 64)
    np.testing.assert_allclose(kept["rotated.jpg"].features, kept["plain.jpg"].features, atol=1e-4)
    # apply: rotated as today's cv2.imread; sizes and boxes follow.
    assert (turned["rotated.jpg"].image_w, turned["rotated.jpg"].image_h) == (64, 96)
    assert (turned["flipped.jpg"].image_w, turned["flipped.jpg"].image_h) == (96, 64)
    assert (turned["rotated.jpg"].boxes[:, 2] <= 64).all() and (turned["rotated.jpg"].boxes[:, 3] <= 96).all()
    assert not np.allclose(turned["rotated.jpg"].boxes, kept["rotated.jpg"].boxes, atol=1e-2)
    assert not np.allclose(turned["flipped.jpg"].boxes, kept["flipped.jpg"].boxes, atol=1e-2)
    np.testing.assert_allclose(turned["plain.jpg"].features, kept["plain.jpg"].features, atol=1e-5)
    detector = load_detector(ExtractParams(arch="tiny", weights="random", seed=7)).detector
    expected = detector.detect([cv2.imread(str(images / "rotated.jpg"), cv2.IMREAD_COLOR)])[0]
    np.testing.assert_allclose(turned["rotated.jpg"].features, expected.features, atol=1e-5, rtol=1e-4)

    # Recorded in the store and the summary; the tag is counted whatever the policy.
    for out, policy in ((ignored, "ignore"), (applied, "apply")):
        assert FeatureStore(out).metadata["exif"] == policy
        summary = json.loads((out / SUMMARY_FILE).read_text())
        assert summary["exif"] == policy and summary["orientation_tagged"] == 2
        assert (out / ERRORS_FILE).read_text() == ""
    # A store made with one policy is not extended with the other.
    result = _run("--images", images, "--out", ignored, *common, "--set", "exif=apply")
    assert result.exit_code == 2 and "exif" in result.output and "already holds features" in result.output


def test_jpeg_without_end_marker_extracted_with_a_warning(tmp_path: Path) -> None:
    from pipeline.extraction import ERRORS_FILE, SUMMARY_FILE

    images = tmp_path / "images"
    whole = _jpeg(_scene(12, 60, 80))
    _write(images / "whole.jpg", whole)
    _write(images / "no_end_marker.jpg", whole[:-2])  # accepted by libjpeg with a warning
    _write(images / "cut.jpg", whole[:-40])  # scan data missing too: truncated
    out = tmp_path / "out"
    result = _run("--images", images, "--out", out, *TINY, "--feature-dtype", "float32", "--num-workers", "0")
    assert result.exit_code == EXIT_IMAGES_FAILED, result.output
    records = _records(out)
    assert sorted(records) == ["no_end_marker.jpg", "whole.jpg"]
    np.testing.assert_array_equal(records["no_end_marker.jpg"].features, records["whole.jpg"].features)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["warnings"] == {"JPEG without end-of-image marker (decoded as libjpeg does)": 1}
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert [(e["image_id"], e["error_type"]) for e in errors] == [("cut.jpg", "truncated")]
