"""benchmarks/gpu_check.py's own machinery, without a GPU: the budget runner, skips, reading the parts'
output, the Markdown block and the exit code. The GPU parts themselves run in `bash benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


gc = _load_gpu_check()


def _env(**changes: object) -> Any:
    values = dict(
        cuda=False,
        no_cuda_reason="no CUDA device: test",
        device_name="CPU only",
        torch_version="2.11.0",
        cuda_version="13.0",
        cudnn_version="9.19.0",
        nccl=True,
        nccl_version="2.28.9",
        torchrun=[sys.executable, "-m", "torch.distributed.run"],
        gloo=True,
        host="test host, 2 CPUs",
        python="3.11.7",
    )
    values.update(changes)
    return gc.Environment(**values)


def _part(plan: Any, interpret: Any = None, *, name: str = "demo", required: bool = False) -> Any:
    return gc.Part(name, "a demo part", required, 30, 30, plan, interpret or gc.interpret_worker)


def _command_part(code: str, *, name: str = "demo", required: bool = False) -> Any:
    """A part whose command is `python -c code RESULT_PATH`."""

    def plan(env: Any, result_path: Path) -> Any:
        return gc.Plan(mode="cpu", command=[sys.executable, "-c", code, str(result_path)])

    return _part(plan, name=name, required=required)


def _row(status: str, *, required: bool = False, name: str = "demo") -> Any:
    return gc.PartResult(name, "t", required, "cpu", status, 1.0, 10.0, f"{status}: details")


# ---- the runner ------------------------------------------------------------------------------------------
def test_a_part_past_its_budget_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('working on it', flush=True)\n"
        "time.sleep(120)\n"
    )
    started = time.perf_counter()
    result = gc.run_part(_command_part(code), _env(), tmp_path / "out", budget_s=3.0)
    assert time.perf_counter() - started < 20
    assert result.status == gc.TIMED_OUT
    assert result.summary.startswith("timed out: stopped after 3 s") and "working on it" in result.summary
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:  # the grandchild got the group's signal too (a zombie counts as gone)
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} still running after the part was stopped")


def test_a_worker_result_file_is_the_verdict(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "json.dump({'status': 'passed', 'summary': 'all good', 'target': 't', 'metrics': {'x': 1}}, "
        "open(sys.argv[1], 'w'))\n"
    )
    result = gc.run_part(_command_part(code), _env(), tmp_path, budget_s=30)
    assert (result.status, result.summary, result.target, result.metrics) == (
        gc.PASSED,
        "all good",
        "t",
        {"x": 1},
    )
    assert Path(result.log).is_file()


def test_a_crash_without_a_result_is_a_failure_naming_the_error(tmp_path: Path) -> None:
    result = gc.run_part(_command_part("raise SystemExit('boom: no kernel')"), _env(), tmp_path, budget_s=30)
    assert result.status == gc.FAILED
    assert "exit 1" in result.summary and "boom: no kernel" in result.summary


def test_a_missing_prerequisite_is_a_skip_not_an_exception(tmp_path: Path) -> None:
    part = _part(lambda env, path: gc.Plan.skipped(gc._module_missing("pipeline.models.not_written_yet")))
    result = gc.run_part(part, _env(), tmp_path, budget_s=30)
    assert result.status == gc.SKIPPED
    assert result.summary == "skipped: module pipeline.models.not_written_yet does not exist yet"


def test_a_part_that_cannot_even_plan_fails_its_row_only(tmp_path: Path) -> None:
    def broken(env: Any, path: Path) -> Any:
        raise RuntimeError("planner bug")

    result = gc.run_part(_part(broken), _env(), tmp_path, budget_s=30)
    assert result.status == gc.FAILED and "planner bug" in result.summary


# ---- planning on this machine ----------------------------------------------------------------------------
def test_prerequisites_are_checked_without_importing() -> None:
    assert gc._module_missing("pipeline.models.xattn") is None
    assert gc._module_missing("pipeline.models.nope") == "module pipeline.models.nope does not exist yet"
    assert gc._module_missing("surely_not_an_installed_module", root=None) is not None


def test_without_cuda_every_part_plans_its_cpu_half_and_says_why(tmp_path: Path) -> None:
    env = _env()
    for part in gc.PARTS:
        plan = part.plan(env, tmp_path / f"{part.name}.json")
        assert plan.skip is None, part.name
        assert plan.mode == "cpu" and plan.gpu_skipped == "no CUDA device: test", part.name
        assert "cuda" not in plan.command or part.name == "cuda-tests", part.name


def test_ddp_needs_torchrun_and_falls_back_to_gloo_without_nccl(tmp_path: Path) -> None:
    assert gc.plan_ddp(_env(torchrun=None), tmp_path / "r.json").skip == (
        "torchrun (torch.distributed.run) is not available"
    )
    no_nccl = gc.plan_ddp(_env(cuda=True, no_cuda_reason="", nccl=False), tmp_path / "r.json")
    assert no_nccl.mode == "cpu" and no_nccl.gpu_skipped == "NCCL not available in this torch"
    with_nccl = gc.plan_ddp(_env(cuda=True, no_cuda_reason=""), tmp_path / "r.json")
    assert with_nccl.mode == "cuda" and with_nccl.gpu_skipped is None
    assert with_nccl.command[-6:-2] == ["--worker", "ddp", "--device", "cuda"]
    assert "--nproc_per_node" in with_nccl.command and "1" in with_nccl.command


# ---- reading the parts' output ---------------------------------------------------------------------------
def test_cuda_tests_all_skipped_on_cpu_is_a_skip_with_the_counts() -> None:
    plan = gc.Plan(mode="cpu", command=["pytest"], gpu_skipped="no CUDA device: test")
    finished = gc.Finished(0, False, 3.0, "....\n20 skipped, 931 deselected in 12.3s\n")
    outcome = gc.interpret_cuda_tests(plan, finished)
    assert outcome.status == gc.SKIPPED and "20 skipped" in outcome.summary
    assert outcome.metrics["counts"] == {"skipped": 20, "deselected": 931}


def test_cuda_tests_failures_are_named() -> None:
    plan = gc.Plan(mode="cuda", command=["pytest"])
    output = (
        "FAILED tests/test_cuda.py::test_tiny_detector_exact_on_cuda_matches_cpu - AssertionError: x\n"
        "1 failed, 19 passed, 931 deselected in 40.1s\n"
    )
    outcome = gc.interpret_cuda_tests(plan, gc.Finished(1, False, 40.0, output))
    assert outcome.status == gc.FAILED
    assert outcome.summary.startswith("1 failed, 19 passed: tests/test_cuda.py::test_tiny_detector")
    passed = gc.interpret_cuda_tests(plan, gc.Finished(0, False, 40.0, "20 passed, 931 deselected in 40s\n"))
    assert passed.status == gc.PASSED and passed.summary == "20 passed"


MMCA_OUTPUT = """\
MMCA evaluation benchmark scale=1.0: 1000 images x 5000 captions (5,000,000 pairs), 36 regions, 12-20 tokens
batched:    800,000 pairs/s,     6.40 s wall,     6.30 s cpu, 0.001 ms/pair
speed-up 500.0x wall, 400.0x cpu | max abs diff 8.75e-08 over 200 pairs (|S| up to 0.057; tolerance 1e-05: ok)
batched, TF32: 2,000,000 pairs/s, 2.50 s wall, 2.50x the float32 time; max abs diff to float32 1.0e-04
"""


def test_mmca_output_is_projected_to_flickr_and_coco() -> None:
    outcome = gc.interpret_mmca(gc.Plan(mode="cuda"), gc.Finished(0, False, 30.0, MMCA_OUTPUT))
    assert outcome.status == gc.PASSED
    assert outcome.metrics["flickr1k_seconds"] == pytest.approx(6.4)
    assert outcome.metrics["coco5k_seconds_projected"] == pytest.approx(6.4 * 25)
    assert outcome.metrics["tf32_seconds"] == pytest.approx(2.5)
    assert outcome.target == "Flickr 1K 6.4 s < 10 s met, COCO 5K 160 s < 120 s MISSED"
    failed = gc.interpret_mmca(gc.Plan(mode="cuda"), gc.Finished(1, False, 30.0, MMCA_OUTPUT))
    assert failed.status == gc.FAILED


def test_extract_targets_are_judged_on_cuda_only() -> None:
    modes = {
        "exact": {"images_per_s": 25.0},
        "bf16": {"images_per_s": 140.0, "boxes_identical": 0.97, "feature_max_rel": 0.01},
    }
    on_gpu = gc.extract_result(True, modes, [], "max rel dev", "feature_max_rel")
    assert on_gpu["status"] == gc.PASSED
    assert on_gpu["target"] == (
        "exact 25 >= 20 img/s met, bf16 140 >= 150 img/s MISSED, bf16 boxes identical 97.0% >= 95% met"
    )
    assert "bf16 140.0 img/s (97% boxes identical, max rel dev 0.01)" in on_gpu["summary"]
    broken = gc.extract_result(False, modes, ["fp16 failed: no kernel"], "max rel dev", "feature_max_rel")
    assert broken["status"] == "failed" and broken["summary"].startswith("fp16 failed: no kernel")


# ---- the report and the exit code ------------------------------------------------------------------------
def test_markdown_block_names_device_versions_date_command_and_every_part() -> None:
    rows = [_row(gc.PASSED, name="xattn"), _row(gc.SKIPPED, name="mmca")]
    rows[0].summary = "a | b"
    rows[0].gpu_skipped = "no CUDA device: test"
    text = gc.render_markdown(
        _env(),
        rows,
        command="bash benchmarks/gpu_check.sh --parts xattn,mmca",
        date="2026-12-02 15:00 UTC",
        seconds=42,
    )
    assert "- Device: none (no CUDA device: test); host test host, 2 CPUs" in text
    assert "- Versions: torch 2.11.0, CUDA 13.0, cuDNN 9.19.0, NCCL 2.28.9, Python 3.11.7" in text
    assert "- Date: 2026-12-02 15:00 UTC" in text
    assert "- Command: `bash benchmarks/gpu_check.sh --parts xattn,mmca`" in text
    assert "- GPU halves not run (no CUDA device: test): xattn; their CPU halves ran instead" in text
    assert "| xattn | cpu | passed | 1 / 10 s | a \\| b |" in text and "| mmca | cpu | skipped |" in text


def test_exit_code_fails_only_on_failures_and_required_timeouts() -> None:
    assert gc.exit_code([_row(gc.SKIPPED), _row(gc.PASSED), _row(gc.TIMED_OUT, required=False)]) == 0
    assert gc.exit_code([_row(gc.SKIPPED), _row(gc.FAILED)]) == 1
    assert gc.exit_code([_row(gc.TIMED_OUT, required=True)]) == 1


def test_main_writes_json_and_markdown_and_returns_the_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPU_CHECK_COMMAND", "bash benchmarks/gpu_check.sh --cpu")
    ok = _command_part(
        "import json, sys; json.dump({'status': 'passed', 'summary': 'fine'}, open(sys.argv[1], 'w'))",
        name="ok",
    )
    missing = _part(lambda env, path: gc.Plan.skipped("no torchrun"), name="missing", required=True)
    assert gc.main(["--out", str(tmp_path / "a"), "--cpu"], parts=[ok, missing]) == 0
    report = json.loads((tmp_path / "a" / "gpu_check.json").read_text())
    assert report["command"] == "bash benchmarks/gpu_check.sh --cpu" and report["exit_code"] == 0
    assert [(p["name"], p["status"]) for p in report["parts"]] == [("ok", "passed"), ("missing", "skipped")]
    assert report["environment"]["cuda"] is False
    assert "- Command: `bash benchmarks/gpu_check.sh --cpu`" in (tmp_path / "a" / "gpu_check.md").read_text()

    failing = _command_part("raise SystemExit(3)", name="bad")
    assert gc.main(["--out", str(tmp_path / "b"), "--cpu", "--parts", "bad"], parts=[ok, failing]) == 1
    report = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert [(p["name"], p["status"]) for p in report["parts"]] == [("bad", "FAILED")]
