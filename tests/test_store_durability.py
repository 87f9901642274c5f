"""A store that is locked, never clobbered and durable: one run at a time per store (a second fails fast
and names the holder; a killed holder frees the lock), parts published by link so none is ever replaced,
fsync of files and directories, and a resumed run that quarantines unreadable parts instead of refusing
the store."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import pipeline.store_writer as store_writer_module
from pipeline import atomic
from pipeline.extraction import SUMMARY_FILE, extract_images
from pipeline.params import ExtractParams
from pipeline.store import (
    LOCK_FILE,
    QUARANTINE_DIR,
    FeatureStore,
    FeatureStoreError,
    RegionRecord,
    list_parts,
)
from pipeline.store_lock import StoreLockedError, store_lock
from pipeline.store_repair import quarantine_unreadable_parts
from pipeline.store_writer import FeatureStoreWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 6
SETTINGS = ExtractParams(batch_size=1, num_workers=0, feature_dtype="float32", rows_per_part=2)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Regions:
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None
    attribute_ids: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None


class MeanColourDetector:
    """One region per image, its feature the mean colour; `gate`, when given, holds the first batch back."""

    def __init__(self, gate: threading.Event | None = None, started: threading.Event | None = None) -> None:
        self.gate, self.started = gate, started

    def to(self, device: torch.device) -> MeanColourDetector:
        return self

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> list[Regions]:
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=60), "the test never opened the gate"
        return [
            Regions(
                boxes=np.array([[0, 0, image.shape[1] - 1, image.shape[0] - 1]], dtype=np.float32),
                features=image.reshape(-1, 3).mean(axis=0, keepdims=True).astype(np.float32),
            )
            for image in images_bgr
        ]

    def image_size_problem(self, height: int, width: int) -> str | None:
        return None


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for index in range(NUM_IMAGES):
        array = np.random.default_rng(index).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"img_{index}.png")
    return root


def _extract(
    images: Path, out: Path, detector: MeanColourDetector | None = None, console: Console | None = None
):
    return extract_images(
        detector or MeanColourDetector(),
        images,
        out,
        SETTINGS,
        metadata={"extractor": "mean-colour"},
        console=console or Console(file=io.StringIO()),
    )


def _records(count: int, start: int = 0) -> list[RegionRecord]:
    return [
        RegionRecord(
            image_id=f"img_{index}",
            image_w=30,
            image_h=20,
            boxes=np.zeros((1, 4), dtype=np.float32),
            features=np.full((1, 3), index, dtype=np.float32),
        )
        for index in range(start, start + count)
    ]


_HOLDER = """
import os, sys, time
from pipeline.store_lock import store_lock
with store_lock(sys.argv[1], command="the holder"):
    child = os.fork()
    if child == 0:  # stands for a DataLoader worker: it must not keep the lock alive
        time.sleep(600)
        os._exit(0)
    print(child, flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_holding_process(root: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """A process that holds the lock of `root` (and has forked a child), until the block ends."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    )
    child = 0
    try:
        child = int(process.stdout.readline())  # type: ignore[union-attr]
        yield process, child
    finally:
        for pid in (process.pid, child):
            with contextlib.suppress(ProcessLookupError, ValueError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------- lock


def test_a_second_run_fails_fast_naming_the_holder_and_the_first_completes(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    gate, started = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def first_run() -> None:
        try:
            outcome["summary"] = _extract(images, out, MeanColourDetector(gate=gate, started=started))
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert started.wait(timeout=60), outcome.get("error")
        live_temporary = out / ".part-0-00000.parquet.live.tmp"  # as if the first run were mid-write
        live_temporary.write_bytes(b"half")
        with pytest.raises(StoreLockedError) as info:
            _extract(images, out)
        message = str(info.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {os.getpid()}" in message and str(out) in message
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"] and holder["command"]
        assert live_temporary.exists(), "the refused run removed the live run's temporary file"
        live_temporary.unlink()
    finally:
        gate.set()
        thread.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].done == NUM_IMAGES  # type: ignore[attr-defined]
    store = FeatureStore(out)
    assert sorted(store.image_ids) == [f"img_{i}.png" for i in range(NUM_IMAGES)]
    assert (out / LOCK_FILE).read_bytes() == b""  # released, and the folder's content is run-independent


def test_the_lock_of_a_killed_holder_is_freed_even_while_its_child_lives(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with lock_holding_process(root) as (process, child):
        with pytest.raises(StoreLockedError, match=rf"pid {process.pid} on .*the holder"), store_lock(root):
            pass
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        os.kill(child, 0)  # the forked child still runs
        with store_lock(root, command="the rerun") as holder:
            assert holder["pid"] == os.getpid()
            assert json.loads((root / LOCK_FILE).read_text())["command"] == "the rerun"


def test_the_cli_reports_a_busy_store_in_one_line(images: Path, tmp_path: Path) -> None:
    from stages.cli import app

    out = tmp_path / "store"
    with lock_holding_process(out) as (process, _):
        result = CliRunner().invoke(
            app,
            ["extract", "--images", str(images), "--out", str(out), "--arch", "tiny", "--weights", "random"],
        )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = next(line for line in lines if line.startswith("error:"))
    assert f"pid {process.pid}" in error and "the holder" in error and "in use by another run" in error


@pytest.mark.slow
def test_ranks_of_a_job_on_a_busy_store_all_fail_at_once(images: Path, tmp_path: Path) -> None:
    """Rank 0 cannot lock: every rank must stop, none may wait for it at a barrier."""
    out = tmp_path / "store"
    command = [sys.executable, "-m", "stages.cli", "extract", "--images", str(images), "--out", str(out)]
    command += ["--arch", "tiny", "--weights", "random", "--num-workers", "0"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with lock_holding_process(out) as (holder, _):
        ranks = []
        for rank in range(2):
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RANK=str(rank))
            env.update(LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            ranks.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = []
        for process in ranks:
            try:
                outputs.append(process.communicate(timeout=240)[0])
            finally:
                if process.poll() is None:
                    process.kill()
    assert [process.returncode for process in ranks] == [2, 2], "\n".join(outputs)
    assert f"pid {holder.pid}" in outputs[0] and "in use by another run" in outputs[0]
    assert "rank 0 could not lock" in outputs[1]


# ---------------------------------------------------------------------------------------- link-publish


def test_publish_new_never_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "part.parquet"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError), atomic.publish_new(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.parquet"]
    fresh = tmp_path / "fresh.parquet"
    with atomic.publish_new(fresh) as tmp:
        tmp.write_bytes(b"new")
    assert fresh.read_bytes() == b"new" and not tmp.exists()


def test_a_part_name_taken_meanwhile_sends_the_part_to_the_next_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    real_publish = atomic.publish_new
    taken: list[Path] = []

    @contextlib.contextmanager
    def racing_publish(path: Path) -> Iterator[Path]:
        with real_publish(path) as tmp:
            yield tmp
            if not taken:  # another writer publishes this name between the check and the link
                Path(path).write_bytes(b"another writer's part")
                taken.append(Path(path))

    monkeypatch.setattr(store_writer_module, "publish_new", racing_publish)
    with FeatureStoreWriter(root, rows_per_part=2) as writer:
        for record in _records(2):
            writer.add(record)
    assert [p.name for p in taken] == ["part-0-00000.parquet"]
    assert (root / "part-0-00000.parquet").read_bytes() == b"another writer's part"
    assert writer.parts_written == [root / "part-0-00001.parquet"]
    assert pq.read_table(root / "part-0-00001.parquet").column("image_id").to_pylist() == ["img_0", "img_1"]
    assert sorted(p.name for p in root.iterdir()) == ["part-0-00000.parquet", "part-0-00001.parquet"]


# ------------------------------------------------------------------------------------------------- fsync


def test_parts_and_atomic_outputs_are_fsynced_with_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    root = tmp_path / "store"
    with FeatureStoreWriter(root, rows_per_part=2) as writer:
        for record in _records(2):
            writer.add(record)
    files = [name for kind, name in synced if kind == "file"]
    assert len(files) == 1 and files[0].startswith(".part-0-00000.parquet.") and files[0].endswith(".tmp")
    assert ("dir", "store") in synced
    assert synced.index(("dir", "store")) > synced.index(("file", files[0]))  # the name after the data

    synced.clear()
    atomic.write_text_atomic(tmp_path / "summary.json", "{}")
    assert [kind for kind, _ in synced] == ["file", "dir"] and synced[1][1] == tmp_path.name


# -------------------------------------------------------------------------------------------- quarantine


def test_unreadable_parts_are_quarantined_and_a_same_name_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FeatureStoreWriter(root, rows_per_part=1) as writer:
        for record in _records(4):
            writer.add(record)
    parts = list_parts(root)
    parts[0].write_bytes(b"")
    parts[1].write_bytes(parts[1].read_bytes()[:-20])  # truncated footer
    pq.write_table(pa.table({"image_id": ["x"]}), parts[2])  # a foreign schema
    moved = quarantine_unreadable_parts(root)
    assert [(m.name, m.moved_to.name) for m in moved] == [(p.name, p.name) for p in parts[:3]]
    assert "zero bytes" in moved[0].reason and "Parquet" in moved[1].reason and "scan_pipe" in moved[2].reason
    assert list_parts(root) == [parts[3]] and FeatureStore(root).image_ids == ["img_3"]
    assert quarantine_unreadable_parts(root) == []

    parts[3].write_bytes(b"")
    earlier = root / QUARANTINE_DIR / parts[3].name
    earlier.write_bytes(b"an earlier quarantine")
    (again,) = quarantine_unreadable_parts(root)
    assert again.moved_to.name == "part-0-00003.1.parquet"
    assert earlier.read_bytes() == b"an earlier quarantine"


def test_a_truncated_part_is_quarantined_on_resume_and_its_images_redone(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    first = _extract(images, out)
    assert (first.done, first.quarantined, first.resume_message) == (NUM_IMAGES, [], "")
    parts = list_parts(out)
    assert len(parts) == NUM_IMAGES // 2
    bad = parts[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # what a power loss used to leave

    with pytest.raises(FeatureStoreError) as info:  # plain reading refuses, names the part and the fix
        FeatureStore(out)
    assert bad.name in str(info.value) and "rerun `scan-pipe extract`" in str(info.value)

    stale = [f".{bad.name}.dead.tmp", f".{SUMMARY_FILE}.dead.tmp", "..extract-rank-1.json.dead.tmp"]
    for name in stale:  # what a killed run leaves; nobody else holds the lock, so they are a dead run's
        (out / name).write_bytes(b"half")
    log = io.StringIO()
    second = _extract(images, out, console=Console(file=log, width=300))
    assert not any((out / name).exists() for name in stale)
    assert (second.done, second.skipped, second.failed) == (2, NUM_IMAGES - 2, 0)
    assert second.quarantined == [bad.name]
    message = f"resuming: {NUM_IMAGES - 2} images already in the store, 2 to do (1 parts quarantined)"
    assert second.resume_message == message
    printed = log.getvalue()
    assert message in printed and f"unreadable part {bad.name}" in printed and QUARANTINE_DIR in printed
    assert "removed 3 temporary file(s)" in printed
    assert (out / QUARANTINE_DIR / bad.name).is_file()
    store = FeatureStore(out)
    assert len(store) == NUM_IMAGES
    assert sorted(store.image_ids) == [f"img_{i}.png" for i in range(NUM_IMAGES)]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["quarantined"] == [bad.name] and summary["resume_message"] == message

    third = _extract(images, out)
    assert (
        third.resume_message
        == f"resuming: {NUM_IMAGES} images already in the store, 0 to do (0 parts quarantined)"
    )
