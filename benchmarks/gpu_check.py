"""One prepared command for a lent GPU: every GPU check of the project, each in its own time budget.

GPU time comes in short windows, so `bash benchmarks/gpu_check.sh` runs, one after the other and each in a
subprocess that is stopped when it overruns its budget (one hang cannot eat the window):

1. cuda-tests  `pytest -m cuda tests/` (tests/test_cuda.py: CUDA against CPU for the detector, NMS, scorer,
               an AMP step and the extraction CLI);
2. extract     detector throughput per precision mode (exact / tf32 / bf16 / fp16) at 600x1000 with random
               full-size weights, boxes identical to exact, feature deviation (benchmarks/extract_modes.py);
3. xattn       SCAN scoring (`xattn_scores`) at the COCO 5K shape, both directions;
4. mmca        MMCA exact evaluation at the Flickr30K shape (benchmarks/mmca_eval.py);
5. amp-train   a few hundred SCAN training steps with AMP on synthetic data: loss finite and decreasing;
6. ddp         a 1-process DDP run under torchrun: NCCL initialised, DDP steps, all_reduce.

A part whose prerequisite is missing (no CUDA, no torchrun, no NCCL, a module not written yet) is skipped with
its reason. Without a GPU each part runs its CPU half (small shapes, tiny models) and the output names the GPU
halves that did not run. At the end: one table, a Markdown block for benchmarks/RESULTS.md (device, versions,
date, command, each part's result) and the same as JSON under --out. Exit status 1 only when a part FAILED
(or a required part timed out); skips and timeouts of the optional benchmark parts do not fail the run.

    bash benchmarks/gpu_check.sh                          # everything (about 8 minutes at most on a GPU)
    bash benchmarks/gpu_check.sh --parts xattn,mmca       # a subset
    bash benchmarks/gpu_check.sh --cpu                    # the CPU halves, even on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.host_info import cpu_name  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "gpu_check_out"
TOTAL_BUDGET_S = {"cuda": 470.0, "cpu": 290.0}  # whole run: under 8 minutes on a GPU, ~5 on a CPU

PASSED, FAILED, SKIPPED, TIMED_OUT = "passed", "FAILED", "skipped", "timed out"


# ---- what the run found on this machine ------------------------------------------------------------------
@dataclass
class Environment:
    """The machine and library versions; `cuda` decides between each part's GPU and CPU half."""

    cuda: bool
    no_cuda_reason: str  # why the GPU halves do not run ("" when they do)
    device_name: str
    torch_version: str
    cuda_version: str
    cudnn_version: str
    nccl: bool
    nccl_version: str
    torchrun: list[str] | None  # the launcher command, None when torch.distributed.run is missing
    gloo: bool
    host: str
    python: str

    @property
    def mode(self) -> str:
        return "cuda" if self.cuda else "cpu"


def probe_environment(force_cpu: bool = False) -> Environment:
    """Ask torch what is here; never raises (a broken CUDA install reads as "no CUDA", with the reason)."""
    import torch

    host = f"{cpu_name()}, {os.cpu_count()} CPUs"
    cuda, reason, name = False, "", "CPU only"
    try:
        if force_cpu:
            reason = "--cpu given"
        elif torch.version.cuda is None:
            reason = "torch built without CUDA"
        elif not torch.cuda.is_available():
            reason = "no CUDA device: torch.cuda.is_available() is False"
        else:
            cuda = True
            props = torch.cuda.get_device_properties(0)
            name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
            if torch.cuda.device_count() > 1:
                name += f", 1 of {torch.cuda.device_count()} GPUs used"
    except Exception as exc:  # a driver mismatch shows here: report it, run the CPU halves
        cuda, reason = False, f"CUDA unusable: {' '.join(str(exc).split())[:200]}"
    nccl = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    nccl_version = ""
    if nccl:
        try:
            nccl_version = ".".join(str(part) for part in torch.cuda.nccl.version())
        except Exception:  # NCCL present in the build but not loadable
            nccl = False
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    launcher = shutil.which("torchrun")
    torchrun: list[str] | None = [launcher] if launcher else None
    if torchrun is None and _module_missing("torch.distributed.run", root=None) is None:
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return Environment(
        cuda=cuda,
        no_cuda_reason=reason,
        device_name=name,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "none",
        cudnn_version=_cudnn_text(cudnn),
        nccl=nccl,
        nccl_version=nccl_version or "none",
        torchrun=torchrun,
        gloo=bool(torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        host=host,
        python=platform.python_version(),
    )


def _cudnn_text(version: int | None) -> str:
    """cuDNN's integer version as text (9.19.0 for 91900; 8.9.7 for 8907)."""
    if not version:
        return "none"
    if version >= 90000:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def _module_missing(dotted: str, root: Path | None = REPO_ROOT) -> str | None:
    """Why `dotted` cannot be imported (None when it can), without importing it.

    With `root`, a project module is looked up as a file (a half-edited module still counts as present and
    then fails loudly in its part); without, through the import system (installed packages).
    """
    if root is not None:
        path = root.joinpath(*dotted.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return None
        return f"module {dotted} does not exist yet"
    import importlib.util

    try:
        found = importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"module {dotted} is not installed"


# ---- one part: plan, run with a budget, interpret --------------------------------------------------------
@dataclass
class Plan:
    """How a part runs here: a command, or the reason it is skipped."""

    mode: str = "cpu"  # the half that runs: "cuda" or "cpu"
    command: list[str] = field(default_factory=list)
    skip: str | None = None
    gpu_skipped: str | None = None  # why the GPU half does not run here (the CPU half runs instead)

    @classmethod
    def skipped(cls, reason: str) -> Plan:
        return cls(mode="-", skip=reason)


@dataclass
class Finished:
    """What a part's subprocess did."""

    returncode: int | None
    timed_out: bool
    seconds: float
    output: str  # stdout and stderr, interleaved
    result: dict[str, Any] | None = None  # the JSON a worker wrote to its result file


@dataclass
class Outcome:
    """A part's verdict from its output."""

    status: str
    summary: str
    target: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """A check with a GPU half and a CPU half, each with its own time budget."""

    name: str
    title: str
    required: bool  # a timeout fails the run (the correctness checks); optional: benchmarks
    gpu_budget_s: float
    cpu_budget_s: float
    plan: Callable[[Environment, Path], Plan]  # (environment, result file) -> plan
    interpret: Callable[[Plan, Finished], Outcome]


@dataclass
class PartResult:
    """One row of the final table (and of the JSON)."""

    name: str
    title: str
    required: bool
    mode: str
    status: str
    seconds: float
    budget_s: float
    summary: str
    target: str = ""
    gpu_skipped: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    log: str | None = None


def run_command(
    command: Sequence[str], *, timeout_s: float, log_path: Path, env: dict[str, str] | None = None
) -> Finished:
    """Run `command` in its own process group, output to `log_path`; past `timeout_s` the whole group is
    stopped (SIGTERM, then SIGKILL after 5 s), so a hung grandchild (torchrun's worker) goes too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            process.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(process)
    seconds = time.perf_counter() - started
    output = log_path.read_text(errors="replace")
    return Finished(None if timed_out else process.returncode, timed_out, seconds, output)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group this run started, SIGKILL if it is still there after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            if sig == signal.SIGTERM:  # the leader is gone; make sure its children are too
                os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _last_line(output: str, limit: int = 160) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else "(no output)"


def run_part(part: Part, env: Environment, out_dir: Path, budget_s: float) -> PartResult:
    """Plan, run and judge one part; any error of the part itself becomes its FAILED row, never a crash."""
    result_path = out_dir / "results" / f"{part.name}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    base = {"name": part.name, "title": part.title, "required": part.required, "budget_s": budget_s}
    try:
        plan = part.plan(env, result_path)
    except Exception as exc:
        return PartResult(**base, mode="-", status=FAILED, seconds=0.0, summary=f"cannot plan: {exc!r}")
    if plan.skip is not None:
        return PartResult(
            **base, mode="-", status=SKIPPED, seconds=0.0, summary=f"skipped: {plan.skip}", gpu_skipped=None
        )
    log_path = out_dir / "logs" / f"{part.name}.log"
    finished = run_command(plan.command, timeout_s=budget_s, log_path=log_path, env=_child_env())
    rows = {**base, "mode": plan.mode, "seconds": finished.seconds, "gpu_skipped": plan.gpu_skipped}
    rows["log"] = str(log_path)
    if finished.timed_out:
        return PartResult(
            **rows,
            status=TIMED_OUT,
            summary=f"timed out: stopped after {budget_s:.0f} s; last output: {_last_line(finished.output)}",
        )
    if result_path.is_file():
        try:
            finished.result = json.loads(result_path.read_text())
        except ValueError:
            finished.result = None
    try:
        outcome = part.interpret(plan, finished)
    except Exception as exc:
        outcome = Outcome(FAILED, f"cannot read its output: {exc!r}; {_last_line(finished.output)}")
    return PartResult(
        **rows, status=outcome.status, summary=outcome.summary, target=outcome.target, metrics=outcome.metrics
    )


def interpret_worker(plan: Plan, finished: Finished) -> Outcome:
    """A worker of this script: its result file says it all; without one it crashed (the log's last line)."""
    result = finished.result
    if result is None:
        return Outcome(FAILED, f"exit {finished.returncode}, no result: {_last_line(finished.output)}")
    status = PASSED if result.get("status") == PASSED and finished.returncode == 0 else FAILED
    summary = str(result.get("summary", ""))
    if status == FAILED and finished.returncode != 0 and result.get("status") == PASSED:
        summary += f" (but exit {finished.returncode})"
    return Outcome(status, summary, str(result.get("target", "")), dict(result.get("metrics", {})))


def _worker_command(name: str, device: str, result_path: Path, *extra: str) -> list[str]:
    worker = ["--worker", name, "--device", device, "--result", str(result_path)]
    return [sys.executable, str(SCRIPT), *worker, *extra]


def _half(env: Environment, plan: Plan) -> Plan:
    """Fill in which half runs, and why the GPU half does not."""
    plan.mode = env.mode
    plan.gpu_skipped = None if env.cuda else env.no_cuda_reason
    return plan


# ---- part 1: the CUDA tests ------------------------------------------------------------------------------
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def plan_cuda_tests(env: Environment, result_path: Path) -> Plan:
    if _module_missing("pytest", root=None):
        return Plan.skipped("pytest is not installed")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"]
    return _half(env, Plan(command=command))


def interpret_cuda_tests(plan: Plan, finished: Finished) -> Outcome:
    """Counts from pytest's last summary line; on CPU every cuda test skipping is a skip, not a pass."""
    summary_lines = [line for line in finished.output.splitlines() if PYTEST_COUNT.search(line)]
    counts: dict[str, int] = {}
    for number, kind in PYTEST_COUNT.findall(summary_lines[-1] if summary_lines else ""):
        counts["errors" if kind.startswith("error") else kind] = int(number)
    failed_tests = [
        line[7:].split(" - ")[0] for line in finished.output.splitlines() if line.startswith("FAILED ")
    ]
    skip_reasons = sorted({line for line in finished.output.splitlines() if line.startswith("SKIPPED ")})
    metrics: dict[str, Any] = {"counts": counts, "failed_tests": failed_tests, "skip_reasons": skip_reasons}
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "deselected") or "no counts"
    if finished.returncode == 5:
        return Outcome(SKIPPED, "skipped: no test is marked cuda", metrics=metrics)
    if finished.returncode != 0:
        names = f": {', '.join(failed_tests[:4])}" if failed_tests else f": {_last_line(finished.output)}"
        return Outcome(FAILED, f"{text}{names}", metrics=metrics)
    if plan.mode == "cpu" and counts.get("passed", 0) == 0:
        summary = f"skipped: {plan.gpu_skipped} ({text}: every cuda test collected and skipped)"
        return Outcome(SKIPPED, summary, "GPU only", metrics)
    return Outcome(PASSED, text, "all cuda tests pass", metrics)


# ---- part 2: extraction throughput per precision mode ----------------------------------------------------
EXTRACT_MODES_SCRIPT = REPO_ROOT / "benchmarks" / "extract_modes.py"
EXACT_TARGET, FAST_TARGET, FAST_IDENTICAL_TARGET = 20.0, 150.0, 0.95


def plan_extract(env: Environment, result_path: Path) -> Plan:
    missing = _module_missing("extractors.bua.factory") or _module_missing("cv2", root=None)
    if missing or not EXTRACT_MODES_SCRIPT.is_file():
        return Plan.skipped(missing or "benchmarks/extract_modes.py does not exist")
    if env.cuda:
        size = ["--arch", "full", "--device", "cuda", "--num-images", "64", "--batch-size", "8"]
    else:
        size = ["--arch", "tiny", "--device", "cpu", "--num-images", "6", "--batch-size", "2"]
    scenes = ["--width", "1000", "--height", "600", "--seed", "0", "--json", str(result_path)]
    return _half(env, Plan(command=[sys.executable, str(EXTRACT_MODES_SCRIPT), *size, *scenes]))


def interpret_extract(plan: Plan, finished: Finished) -> Outcome:
    """benchmarks/extract_modes.py's verdict, through its --json rows."""
    rows = (finished.result or {}).get("rows")
    if finished.returncode != 0 or not rows:
        return Outcome(FAILED, f"extract_modes.py exit {finished.returncode}: {_last_line(finished.output)}")
    modes = {
        row["mode"]: {
            "images_per_s": row["images_per_s"],
            "boxes_identical": row["boxes_identical"],
            "feature_max_rel": row["feature_max_rel"],
            "feature_mean_rel": row["feature_mean_rel"],
            "proposals_identical": row.get("proposals_identical"),
        }
        for row in rows
        if not row.get("error")
    }
    problems = [f"{row['mode']} failed: {row['error']}" for row in rows if row.get("error")]
    result = extract_result(plan.mode == "cuda", modes, problems, "max rel dev", "feature_max_rel")
    result["metrics"]["header"] = finished.result.get("header") if finished.result else None
    return interpret_worker(plan, Finished(0, False, finished.seconds, finished.output, result))


def extract_result(
    cuda: bool, modes: dict[str, dict[str, Any]], problems: list[str], deviation: str, key: str
) -> dict[str, Any]:
    """Summary and targets of per-mode rates and agreement (exact first), as a worker result."""
    parts = []
    for mode, row in modes.items():
        text = f"{mode} {row['images_per_s']:.1f} img/s"
        if mode != "exact":
            text += f" ({row['boxes_identical']:.0%} boxes identical, {deviation} {row[key]:.2g})"
        parts.append(text)
    target = "GPU only (tiny arch here)"
    if cuda and "exact" in modes and "bf16" in modes:
        exact_rate, fast = modes["exact"]["images_per_s"], modes["bf16"]
        target = ", ".join(
            [
                _target(f"exact {exact_rate:.0f} >= {EXACT_TARGET:.0f} img/s", exact_rate >= EXACT_TARGET),
                _target(
                    f"bf16 {fast['images_per_s']:.0f} >= {FAST_TARGET:.0f} img/s",
                    fast["images_per_s"] >= FAST_TARGET,
                ),
                _target(
                    f"bf16 boxes identical {fast['boxes_identical']:.1%} >= {FAST_IDENTICAL_TARGET:.0%}",
                    fast["boxes_identical"] >= FAST_IDENTICAL_TARGET,
                ),
            ]
        )
    metrics: dict[str, Any] = {"modes": modes}
    summary = "; ".join(parts)
    if problems:
        return {"status": "failed", "summary": "; ".join(problems) + " | " + summary, "metrics": metrics}
    return {"status": PASSED, "summary": summary, "target": target, "metrics": metrics}


def _target(text: str, met: bool) -> str:
    return f"{text} {'met' if met else 'MISSED'}"


# ---- part 3: SCAN scoring at the COCO 5K shape -----------------------------------------------------------
XATTN_TARGET_S = 10.0  # README: COCO 5K under 10 s per model on an H100


def plan_xattn(env: Environment, result_path: Path) -> Plan:
    missing = _module_missing("pipeline.models.xattn")
    if missing:
        return Plan.skipped(missing)
    scale = "1.0" if env.cuda else "0.02"
    return _half(env, Plan(command=_worker_command("xattn", env.mode, result_path, "--scale", scale)))


def worker_xattn(device_name: str, scale: float) -> dict[str, Any]:
    """Time `xattn_scores` over all images x captions per direction; a corner checked against the loop."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from xattn import DIRECTION_DEFAULTS, SHAPES, loop_scores

    from pipeline.models.xattn import xattn_scores

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:  # exact float32 products, as the evaluation
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    n_img, n_cap, regions, words, dim = SHAPES["coco5k"]
    n_img, n_cap = max(8, round(n_img * scale)), max(16, round(n_cap * scale))
    generator = torch.Generator(device=device).manual_seed(0)
    images = F.normalize(torch.randn(n_img, regions, dim, generator=generator, device=device), dim=-1)
    captions = F.normalize(torch.randn(n_cap, words, dim, generator=generator, device=device), dim=-1)
    lengths = torch.randint(max(1, words - 4), words + 1, (n_cap,), generator=generator, device=device)
    captions = captions * (torch.arange(words, device=device)[None, :] < lengths[:, None])[..., None]
    metrics: dict[str, Any] = {
        "images": n_img,
        "captions": n_cap,
        "regions": regions,
        "words": words,
        "d": dim,
    }
    pairs = n_img * n_cap
    failures, parts = [], []
    with torch.inference_mode():
        for direction, (lambda_softmax, lambda_lse) in DIRECTION_DEFAULTS.items():
            options = dict(
                direction=direction,
                raw_feature_norm="clipped_l2norm",
                agg="LogSumExp",
                lambda_softmax=lambda_softmax,
                lambda_lse=lambda_lse,
            )
            xattn_scores(images[:4], captions[:8], lengths[:8], **options)  # warm-up
            _sync(device)
            started = time.perf_counter()
            scores = xattn_scores(images, captions, lengths, **options)
            _sync(device)
            seconds = time.perf_counter() - started
            corner = loop_scores(images[:8].cpu(), captions[:16].cpu(), lengths[:16].cpu(), **options)
            difference = float((scores[:8, :16].cpu().double() - corner.double()).abs().max())
            finite = bool(torch.isfinite(scores).all())
            metrics[direction] = {
                "seconds": seconds,
                "pairs_per_s": pairs / seconds,
                "max_abs_diff_vs_loop": difference,
                "coco5k_seconds_projected": seconds * 5000 * 25000 / pairs,
            }
            if not finite or difference > 1e-4:
                failures.append(f"{direction}: finite {finite}, max |fast - loop| {difference:.1e}")
            parts.append(
                f"{direction} {seconds:.2f} s ({pairs / seconds:,.0f} pairs/s, diff {difference:.0e})"
            )
            del scores
    if cuda:
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    summary = f"{n_img:,} x {n_cap:,}, d {dim}: " + "; ".join(parts)
    if cuda and scale == 1.0:
        target = ", ".join(
            _target(
                f"{d} {metrics[d]['seconds']:.1f} s < {XATTN_TARGET_S:.0f} s",
                metrics[d]["seconds"] < XATTN_TARGET_S,
            )
            for d in DIRECTION_DEFAULTS
        )
    else:
        projected = sum(metrics[d]["coco5k_seconds_projected"] for d in DIRECTION_DEFAULTS)
        target = f"GPU only; COCO 5K here ~{_duration(projected)} (both directions, linear)"
    if failures:
        return {"status": "failed", "summary": "; ".join(failures), "metrics": metrics}
    return {"status": PASSED, "summary": summary, "target": target, "metrics": metrics}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---- part 4: MMCA exact evaluation -----------------------------------------------------------------------
MMCA_SCRIPT = REPO_ROOT / "benchmarks" / "mmca_eval.py"
FLICKR_PAIRS, COCO5K_PAIRS = 1000 * 5000, 5000 * 25000
MMCA_FLICKR_TARGET_S, MMCA_COCO_TARGET_S = 10.0, 120.0
MMCA_BATCHED = re.compile(r"batched:\s+([\d,.]+) pairs/s,\s+([\d.]+) s wall")
MMCA_SHAPE = re.compile(r"(\d+) images x (\d+) captions")
MMCA_DIFF = re.compile(r"max abs diff ([\d.eE+-]+) over")
MMCA_TF32 = re.compile(r"batched, TF32: [\d,.]+ pairs/s, ([\d.]+) s wall")


def plan_mmca(env: Environment, result_path: Path) -> Plan:
    missing = _module_missing("pipeline.models.mmca")
    if missing or not MMCA_SCRIPT.is_file():
        return Plan.skipped(missing or "benchmarks/mmca_eval.py does not exist")
    loop = ["--loop-images", "2", "--loop-captions", "100" if env.cuda else "20"]
    scale = (
        ["--device", "cuda", "--scale", "1.0", "--tf32"]
        if env.cuda
        else ["--scale", "0.02", "--threads", "1"]
    )
    options = [*scale, *loop]
    return _half(env, Plan(command=[sys.executable, str(MMCA_SCRIPT), *options]))


def interpret_mmca(plan: Plan, finished: Finished) -> Outcome:
    """Batched wall time from mmca_eval.py's output, projected linearly in pairs to Flickr and COCO 5K."""
    batched, shape = MMCA_BATCHED.search(finished.output), MMCA_SHAPE.search(finished.output)
    if batched is None or shape is None:
        return Outcome(FAILED, f"exit {finished.returncode}: {_last_line(finished.output)}")
    pairs = int(shape.group(1)) * int(shape.group(2))
    seconds = float(batched.group(2))
    flickr, coco = seconds / pairs * FLICKR_PAIRS, seconds / pairs * COCO5K_PAIRS
    diff = MMCA_DIFF.search(finished.output)
    tf32 = MMCA_TF32.search(finished.output)
    metrics: dict[str, Any] = {
        "pairs": pairs,
        "batched_seconds": seconds,
        "flickr1k_seconds": flickr,
        "coco5k_seconds_projected": coco,
        "max_abs_diff_vs_loop": float(diff.group(1)) if diff else None,
        "tf32_seconds": float(tf32.group(1)) if tf32 else None,
    }
    measured = "measured" if pairs == FLICKR_PAIRS else "projected"
    summary = (
        f"{shape.group(1)} x {shape.group(2)}: {seconds:.2f} s; Flickr30K 1K {_duration(flickr)} "
        f"({measured}), COCO 5K {_duration(coco)} (projected); diff vs loop {metrics['max_abs_diff_vs_loop']}"
    )
    if tf32:
        summary += f"; TF32 {float(tf32.group(1)):.2f} s"
    if plan.mode == "cuda":
        target = ", ".join(
            [
                _target(
                    f"Flickr 1K {flickr:.1f} s < {MMCA_FLICKR_TARGET_S:.0f} s", flickr < MMCA_FLICKR_TARGET_S
                ),
                _target(f"COCO 5K {coco:.0f} s < {MMCA_COCO_TARGET_S:.0f} s", coco < MMCA_COCO_TARGET_S),
            ]
        )
    else:
        target = "GPU only"
    if finished.returncode != 0:
        return Outcome(
            FAILED, f"exit {finished.returncode} (tolerance exceeded?): {summary}", target, metrics
        )
    return Outcome(PASSED, summary, target, metrics)


# ---- part 5: AMP training smoke --------------------------------------------------------------------------
def plan_train(env: Environment, result_path: Path) -> Plan:
    missing = _module_missing("pipeline.train")
    if missing:
        return Plan.skipped(missing)
    return _half(env, Plan(command=_worker_command("train", env.mode, result_path)))


def synthetic_pairs(
    count: int, regions: int, img_dim: int, *, concepts: int = 40, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Region features holding 3 concept vectors each, captions naming them: a task SCAN can learn."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(concepts, img_dim, generator=generator), dim=1)
    objects = torch.stack([torch.randperm(concepts, generator=generator)[:3] for _ in range(count)])
    features = 0.3 * torch.randn(count, regions, img_dim, generator=generator)
    features[:, :3] += 3.0 * vectors[objects]
    fillers = 6  # token ids: 0 pad, 1.. fillers, then one word per concept
    filler = torch.randint(1, fillers + 1, (count, 2), generator=generator)
    tokens = torch.cat([filler[:, :1], objects + fillers + 1, filler[:, 1:]], dim=1)
    return {
        "region_features": features.to(device),
        "region_lengths": torch.full((count,), regions, dtype=torch.int64, device=device),
        "caption_inputs": tokens.to(device),
        "caption_lengths": torch.full((count,), tokens.shape[1], dtype=torch.int64, device=device),
        "vocab_size": concepts + fillers + 1,
    }


def _batches(data: dict[str, Any], batch_size: int, steps: int, seed: int) -> Iterator[Any]:
    """`steps` batches drawn without repeats inside a batch (a repeated image would be its own negative)."""
    import torch

    from pipeline.loaders import PairBatch

    generator = torch.Generator().manual_seed(seed)
    count = data["region_features"].shape[0]
    for _ in range(steps):
        rows = torch.randperm(count, generator=generator)[:batch_size].to(data["region_features"].device)
        yield PairBatch(
            data["region_features"][rows],
            data["region_lengths"][rows],
            data["caption_inputs"][rows],
            data["caption_lengths"][rows],
            rows,
        )


def worker_train(device_name: str) -> dict[str, Any]:
    """SCAN through the trainer's own step (`training_steps`): AMP bf16 on CUDA (plus a short fp16 run with
    its GradScaler), float32 on CPU; every loss finite and the last steps' mean below the first steps'."""
    import torch

    from pipeline.params import TrainParams
    from pipeline.train import build_seeded_model, training_steps

    cuda = device_name == "cuda"
    if cuda:
        steps, window, batch, regions, img_dim = 300, 20, 128, 36, 2048
        sizes: dict[str, Any] = {}  # the published SCAN sizes (embed 1024, word_dim 300)
    else:
        steps, window, batch, regions, img_dim = 30, 10, 32, 12, 64
        sizes = {"embed_size": 64, "word_dim": 32}
    data = synthetic_pairs(4 * batch * 4, regions, img_dim, device=device_name)
    params = TrainParams(
        model="scan_t2i_avg",
        lr=None if cuda else 2e-3,  # None: the published 2e-4
        batch_size=batch,
        amp=cuda,
        amp_dtype="bf16",
        **sizes,
    )
    model = build_seeded_model(params.resolved(), img_dim=img_dim, vocab_size=data["vocab_size"])
    started = time.perf_counter()
    results = training_steps(model, _batches(data, batch, steps, seed=1), params, device=device_name)
    seconds = time.perf_counter() - started
    losses = [step.loss for step in results]
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    finite = all(math.isfinite(x) for x in losses) and all(math.isfinite(s.grad_norm) for s in results)
    metrics: dict[str, Any] = {
        "steps": steps,
        "batch_size": batch,
        "amp": "bf16" if cuda else "off (CPU)",
        "steps_per_s": steps / seconds,
        "first_mean": first,
        "last_mean": last,
        "losses": [round(x, 5) for x in losses],
    }
    problems = []
    if not finite:
        problems.append("non-finite loss or gradient norm")
    if not last < first:
        problems.append(f"loss not decreasing: first {window} mean {first:.4f}, last {window} {last:.4f}")
    summary = (
        f"{steps} steps, batch {batch}, {metrics['amp']}: loss {first:.3f} -> {last:.3f} "
        f"(mean of first / last {window}), {steps / seconds:.1f} steps/s"
    )
    if cuda:  # float16 autocast adds the GradScaler: a short run must stay finite too
        fp16 = params.model_copy(update={"amp_dtype": "fp16"})
        model16 = build_seeded_model(fp16.resolved(), img_dim=img_dim, vocab_size=data["vocab_size"])
        steps16 = training_steps(model16, _batches(data, batch, 40, seed=2), fp16, device=device_name)
        finite16 = all(math.isfinite(s.loss) for s in steps16)
        weights16 = all(bool(torch.isfinite(p).all()) for p in model16.parameters())
        metrics["fp16_losses"] = [round(s.loss, 5) for s in steps16]
        summary += f"; fp16 + GradScaler 40 steps: loss {steps16[0].loss:.3f} -> {steps16[-1].loss:.3f}"
        if not (finite16 and weights16):
            problems.append("fp16: non-finite loss or weights")
    if problems:
        return {"status": "failed", "summary": "; ".join(problems) + " | " + summary, "metrics": metrics}
    return {"status": PASSED, "summary": summary, "target": "loss finite and decreasing", "metrics": metrics}


# ---- part 6: DDP under torchrun --------------------------------------------------------------------------
def plan_ddp(env: Environment, result_path: Path) -> Plan:
    if env.torchrun is None:
        return Plan.skipped("torchrun (torch.distributed.run) is not available")
    if env.cuda and env.nccl:
        device, note = "cuda", None
    elif env.gloo:
        device, note = "cpu", (env.no_cuda_reason if not env.cuda else "NCCL not available in this torch")
    else:
        return Plan.skipped("neither NCCL (with CUDA) nor gloo is available")
    launch = [*env.torchrun, "--standalone", "--nproc_per_node", "1"]
    worker = ["--worker", "ddp", "--device", device, "--result", str(result_path)]
    return Plan(mode=device, command=[*launch, str(SCRIPT), *worker], gpu_skipped=note)


def worker_ddp(device_name: str) -> dict[str, Any]:
    """Inside torchrun: init the process group (NCCL on CUDA, gloo on CPU), a few steps of a DDP-wrapped
    `ContrastiveStep` equal to the same steps without DDP, and an all_reduce with the expected sum."""
    import copy
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from pipeline.distributed import DistributedContext
    from pipeline.models.build import create_model
    from pipeline.train import ContrastiveStep

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device_name == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    backend = "nccl" if cuda else "gloo"
    extra = {"device_id": device} if cuda else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=60), **extra)
    try:
        total = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(total)
        expected = world * (world + 1) / 2
        reduce_ok = bool(torch.all(total == expected))
        torch.manual_seed(5)
        model = create_model("scan_t2i_lse", vocab_size=30, img_dim=12, embed_size=16, word_dim=8).to(device)
        plain = copy.deepcopy(model)
        context = DistributedContext(
            rank=rank, world_size=world, local_rank=local, device=device, backend=backend
        )
        wrapped = torch.nn.parallel.DistributedDataParallel(
            ContrastiveStep(model, margin=0.2, max_violation=True, context=context),
            device_ids=[local] if cuda else None,
        )
        reference = ContrastiveStep(
            plain, margin=0.2, max_violation=True, context=DistributedContext(device=device)
        )
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
        generator = torch.Generator().manual_seed(11)
        losses = []
        for _ in range(5):
            regions = torch.randn(8, 5, 12, generator=generator).to(device)
            tokens = torch.randint(1, 30, (8, 6), generator=generator).to(device)
            region_lengths = torch.full((8,), 5, device=device)
            caption_lengths = torch.full((8,), 6, device=device)
            for step, optimizer in zip((wrapped, reference), optimizers, strict=True):
                optimizer.zero_grad(set_to_none=True)
                loss = step(regions, region_lengths, tokens, caption_lengths)
                loss.backward()
                optimizer.step()
                if step is wrapped:
                    losses.append(float(loss.detach()))
        difference = max(
            float((a - b).detach().abs().max())
            for a, b in zip(model.parameters(), plain.parameters(), strict=True)
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    metrics = {
        "backend": backend,
        "world_size": world,
        "all_reduce_ok": reduce_ok,
        "losses": losses,
        "max_weight_diff_vs_plain": difference,
    }
    finite = all(math.isfinite(x) for x in losses)
    ok = reduce_ok and finite and difference <= 1e-5
    summary = (
        f"{backend}, world {world}: all_reduce {'ok' if reduce_ok else 'WRONG'}, 5 DDP steps loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}, weights vs no-DDP max diff {difference:.1e}"
    )
    target = "NCCL all_reduce and DDP steps = plain steps" if cuda else "GPU half: the same with NCCL"
    return {"status": PASSED if ok else "failed", "summary": summary, "target": target, "metrics": metrics}


# ---- the parts, the run, the report ----------------------------------------------------------------------
PARTS: tuple[Part, ...] = (
    Part("cuda-tests", "CUDA tests (pytest -m cuda)", True, 120, 90, plan_cuda_tests, interpret_cuda_tests),
    Part("extract", "extraction per precision mode", False, 100, 60, plan_extract, interpret_extract),
    Part("xattn", "SCAN scoring, COCO 5K shape", False, 60, 40, plan_xattn, interpret_worker),
    Part("mmca", "MMCA exact evaluation, Flickr shape", False, 75, 60, plan_mmca, interpret_mmca),
    Part("amp-train", "SCAN training smoke (AMP)", True, 60, 45, plan_train, interpret_worker),
    Part("ddp", "DDP under torchrun (NCCL / gloo)", True, 45, 45, plan_ddp, interpret_worker),
)
WORKERS = ("xattn", "train", "ddp")


def exit_code(results: Sequence[PartResult]) -> int:
    """1 when a part failed or a required part timed out; skips and optional timeouts pass."""
    bad = [r for r in results if r.status == FAILED or (r.status == TIMED_OUT and r.required)]
    return 1 if bad else 0


def overall(results: Sequence[PartResult]) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    verdict = "FAILED" if exit_code(results) else "passed"
    return f"{verdict} ({', '.join(f'{n} {status}' for status, n in counts.items())})"


def gpu_halves_not_run(results: Sequence[PartResult]) -> list[str]:
    """One line per reason: the parts whose GPU half did not run (their CPU half did)."""
    reasons: dict[str, list[str]] = {}
    for r in results:
        if r.gpu_skipped:
            reasons.setdefault(r.gpu_skipped, []).append(r.name)
    return [
        f"GPU halves not run ({reason}): {', '.join(names)}; their CPU halves ran instead"
        for reason, names in reasons.items()
    ]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(
    env: Environment, results: Sequence[PartResult], *, command: str, date: str, seconds: float
) -> str:
    """The block to paste into benchmarks/RESULTS.md."""
    device = env.device_name if env.cuda else f"none ({env.no_cuda_reason})"
    lines = [
        f"### GPU check ({date[:10]})",
        "",
        f"- Device: {device}; host {env.host}",
        f"- Versions: torch {env.torch_version}, CUDA {env.cuda_version}, cuDNN {env.cudnn_version}, "
        f"NCCL {env.nccl_version}, Python {env.python}",
        f"- Date: {date}",
        f"- Command: `{command}`",
        f"- Result: {overall(results)} in {seconds:.0f} s",
    ]
    lines += [f"- {line}" for line in gpu_halves_not_run(results)]
    lines += [
        "",
        "| part | ran on | status | time / budget | result | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.mode} | {r.status} | {r.seconds:.0f} / {r.budget_s:.0f} s "
            f"| {_cell(r.summary)} | {_cell(r.target)} |"
        )
    return "\n".join(lines) + "\n"


def print_table(results: Sequence[PartResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GPU check", show_lines=True)
    for column in ("part", "ran on", "status", "time / budget", "result", "target"):
        table.add_column(column, overflow="fold")
    styles = {PASSED: "green", FAILED: "bold red", SKIPPED: "yellow", TIMED_OUT: "magenta"}
    for r in results:
        table.add_row(
            r.name,
            r.mode,
            f"[{styles.get(r.status, '')}]{r.status}[/]",
            f"{r.seconds:.0f} / {r.budget_s:.0f} s",
            r.summary,
            r.target,
        )
    Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160)).print(table)


def _run_worker(args: argparse.Namespace) -> int:
    """Hidden mode: one part's measurement in this (sub)process; the verdict goes to --result as JSON."""
    if args.worker == "ddp" and int(os.environ.get("RANK", "0")) != 0:
        worker_ddp(args.device)
        return 0
    if args.worker == "xattn":
        result = worker_xattn(args.device, args.scale)
    elif args.worker == "train":
        result = worker_train(args.device)
    else:
        result = worker_ddp(args.device)
    print(result["summary"], flush=True)
    if args.result is not None:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == PASSED else 1


def main(argv: Sequence[str] | None = None, parts: Sequence[Part] = PARTS) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON, Markdown and logs"
    )
    parser.add_argument(
        "--parts", default=None, help=f"comma-separated subset of {', '.join(p.name for p in parts)}"
    )
    parser.add_argument("--cpu", action="store_true", help="run the CPU halves even where CUDA is present")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    parser.add_argument(
        "--total-s", type=float, default=None, help="budget of the whole run (default 470 / 290)"
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _run_worker(args)

    selected = list(parts)
    if args.parts:
        names = [name.strip() for name in args.parts.split(",") if name.strip()]
        unknown = sorted(set(names) - {p.name for p in parts})
        if unknown:
            parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(p.name for p in parts)}")
        selected = [p for p in parts if p.name in names]
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(
        ["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]
    )
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = probe_environment(force_cpu=args.cpu)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    total = args.total_s if args.total_s is not None else TOTAL_BUDGET_S[env.mode]
    device = env.device_name if env.cuda else f"no GPU: {env.no_cuda_reason}"
    print(
        f"gpu_check: {device}; torch {env.torch_version}, "
        f"CUDA {env.cuda_version}, cuDNN {env.cudnn_version}; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {len(selected)} part(s) within {total:.0f} s",
        flush=True,
    )
    started = time.perf_counter()
    results: list[PartResult] = []
    for index, part in enumerate(selected, 1):
        remaining = total - (time.perf_counter() - started)
        budget = min((part.gpu_budget_s if env.cuda else part.cpu_budget_s) * args.budget_scale, remaining)
        if budget < 5:
            results.append(
                PartResult(
                    part.name,
                    part.title,
                    part.required,
                    "-",
                    SKIPPED,
                    0.0,
                    0.0,
                    f"skipped: the run's {total:.0f} s were used up",
                )
            )
            continue
        print(f"[{index}/{len(selected)}] {part.name}: {part.title} (budget {budget:.0f} s) ...", flush=True)
        result = run_part(part, env, out, budget)
        results.append(result)
        print(f"    {result.status} in {result.seconds:.1f} s on {result.mode}: {result.summary}", flush=True)
    seconds = time.perf_counter() - started

    print_table(results)
    for line in gpu_halves_not_run(results):
        print(line.replace("not run", "NOT RUN", 1))
    markdown = render_markdown(env, results, command=command, date=date, seconds=seconds)
    print("\n----- Markdown for benchmarks/RESULTS.md -----\n" + markdown + "----- end -----", flush=True)
    report = {
        "date": date,
        "command": command,
        "seconds": seconds,
        "load_average_end": os.getloadavg(),
        "environment": asdict(env),
        "overall": overall(results),
        "exit_code": exit_code(results),
        "parts": [asdict(r) for r in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown)
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, logs in {out / 'logs'}")
    return exit_code(results)


if __name__ == "__main__":
    raise SystemExit(main())
