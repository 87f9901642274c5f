"""Seed spread: the math on real metrics files, reading DVC experiments, the CLI, the report section, and a
real `dvc exp run` per seed in a throwaway project."""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.metrics import METRIC_KEYS, evaluate_protocol, write_metrics_json
from pipeline.report.published import load_published_results
from pipeline.seed_runs import SeedRunError, run_seeds
from pipeline.spread import (
    EVAL_METRICS_FILE,
    RunSet,
    SpreadError,
    build_spread,
    metric_spread,
    paper_reference,
    runs_from_dvc_experiments,
    runs_from_metrics_files,
)
from stages.cli import app
from tests.conftest import REPO_ROOT

N_IMAGES = 20
CPI = 5
SEEDS = (0, 1, 2, 3, 4)
VARIANT = "scan_i2t_avg"  # has a published Flickr30K row and a published seed range for i2t R@1


def _fake_metrics(seed: int) -> dict[str, Any]:
    """What `scan-pipe evaluate` writes, for a random score matrix whose quality depends on the seed."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(N_IMAGES, N_IMAGES * CPI))
    captions = np.arange(N_IMAGES * CPI)
    scores[captions // CPI, captions] += 1.0 + 0.1 * seed
    metrics = evaluate_protocol(scores, "flickr30k_1k", CPI)
    metrics["models"] = [VARIANT]
    return metrics


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Evaluate folders runs/seed-N/ holding metrics.json written by the real writer."""
    root = tmp_path_factory.mktemp("seeds")
    runs = {}
    for seed in SEEDS:
        folder = root / f"seed-{seed}"
        write_metrics_json(folder / "metrics.json", _fake_metrics(seed))
        runs[f"seed-{seed}"] = folder
    return runs


def _expected(runs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each metric's values over the runs, read back independently of pipeline.spread."""
    loaded = [json.loads((folder / "metrics.json").read_text()) for folder in runs.values()]
    return {key: np.array([data[key] for data in loaded], dtype=float) for key in METRIC_KEYS}


# -- the math ---------------------------------------------------------------------------------------------


def test_spread_matches_numpy(seed_runs: dict[str, Path]) -> None:
    runs = runs_from_metrics_files(seed_runs.values())
    assert list(runs) == list(seed_runs)  # named after their folders, in the order given
    assert runs.protocol == "flickr30k_1k" and runs.variant == VARIANT
    spread = metric_spread(runs)
    assert list(spread.index) == list(METRIC_KEYS)
    names = list(seed_runs)
    for key, values in _expected(seed_runs).items():
        row = spread.loc[key]
        assert row["n"] == len(SEEDS)
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["min"] == pytest.approx(values.min()) and row["max"] == pytest.approx(values.max())
        assert row["min_run"] == names[int(np.argmin(values))]
        assert row["max_run"] == names[int(np.argmax(values))]
    assert spread.loc["rsum", "std"] > 0  # the fake seeds do differ


def test_one_run_has_no_std(seed_runs: dict[str, Path]) -> None:
    spread = metric_spread(runs_from_metrics_files([seed_runs["seed-2"]]))
    assert (spread["n"] == 1).all()
    assert spread["std"].isna().all()
    assert (spread["min"] == spread["max"]).all()


def test_missing_or_bad_metric_names_run_and_metric() -> None:
    good = {key: 1.0 for key in METRIC_KEYS}
    lacking = {key: 1.0 for key in METRIC_KEYS if key != "t2i_r5"}
    with pytest.raises(SpreadError, match=r"run b: metric t2i_r5 is missing"):
        metric_spread({"a": good, "b": lacking})
    with pytest.raises(SpreadError, match=r"run a: metric rsum is nan"):
        metric_spread({"a": {**good, "rsum": math.nan}})
    with pytest.raises(SpreadError, match="no runs"):
        metric_spread({})


def test_metrics_file_errors_name_the_file(tmp_path: Path, seed_runs: dict[str, Path]) -> None:
    with pytest.raises(SpreadError, match=r"absent: no such metrics file or evaluate folder"):
        runs_from_metrics_files([tmp_path / "absent"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpreadError, match=r"empty/metrics\.json: metrics file not found"):
        runs_from_metrics_files([tmp_path / "empty"])
    broken = tmp_path / "broken" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    with pytest.raises(SpreadError, match=r"broken/metrics\.json: not valid JSON"):
        runs_from_metrics_files([seed_runs["seed-0"], broken])
    listed = tmp_path / "list" / "metrics.json"
    listed.parent.mkdir()
    listed.write_text("[1, 2]")
    with pytest.raises(SpreadError, match=r"list/metrics\.json: expected a JSON object"):
        runs_from_metrics_files([listed])
    with pytest.raises(SpreadError, match="cannot tell the runs apart"):
        runs_from_metrics_files([seed_runs["seed-0"], seed_runs["seed-0"] / "metrics.json"])


def test_runs_that_differ_beyond_the_seed_are_refused(tmp_path: Path, seed_runs: dict[str, Path]) -> None:
    other = tmp_path / "coco" / "eval"
    write_metrics_json(other / "metrics.json", {**_fake_metrics(7), "protocol": "coco_5k"})
    with pytest.raises(SpreadError, match=r"differ in protocol .*coco_5k.*not seed spread"):
        runs_from_metrics_files([seed_runs["seed-0"], other])
    mixed = runs_from_metrics_files([seed_runs["seed-0"], other], allow_differences=True)
    assert mixed.protocol is None and len(mixed) == 2


def test_same_folder_names_are_told_apart(tmp_path: Path) -> None:
    for run in ("a", "b"):
        write_metrics_json(tmp_path / run / "eval" / "metrics.json", _fake_metrics(1))
    runs = runs_from_metrics_files([tmp_path / "a" / "eval", tmp_path / "b" / "eval" / "metrics.json"])
    assert list(runs) == ["a/eval", "b/eval"]


def test_paper_numbers_and_seed_range_beside(seed_runs: dict[str, Path]) -> None:
    reference = paper_reference("flickr30k", "flickr30k_1k", VARIANT)
    assert reference is not None and reference.values["i2t_r1"] == 67.9
    assert reference.values["rsum"] == pytest.approx(67.9 + 89.0 + 94.4 + 43.9 + 74.2 + 82.8)
    (bundled,) = [  # the bundled seed range of this variant, compared as data (not copied numbers)
        entry for entry in load_published_results()["seed_spread"] if entry["variant"] == VARIANT
    ]
    assert reference.seed_ranges == {
        key: tuple(value) for key, value in bundled.items() if key.startswith(("i2t_", "t2i_"))
    }
    assert reference.seed_source == bundled["source"]
    assert paper_reference("sample", "flickr30k_1k", VARIANT) is None
    assert paper_reference("flickr30k", "all", "scan_t2i_avg").values["t2i_r1"] == 45.8  # whole matrix

    report = build_spread(runs_from_metrics_files(seed_runs.values()), dataset="flickr30k")
    assert report.frame.loc["i2t_r1", "paper"] == 67.9
    assert report.frame.loc["i2t_r1", "paper_seed_min"] == bundled["i2t_r1"][0]
    assert math.isnan(report.frame.loc["i2t_medr", "paper"])  # the paper gives no ranks
    unknown = build_spread(runs_from_metrics_files(seed_runs.values()))
    assert unknown.paper is None and "dataset unknown" in unknown.notes[0]
    assert unknown.frame["paper"].isna().all()


# -- DVC experiments ------------------------------------------------------------------------------------


def _exp(name: str, seed: int, metrics: dict[str, Any] | None, *, state: str | None = None, **params: Any):
    """One experiment as `dvc exp show --json` (DVC 3.x) lists it under its baseline."""
    train = {"seed": seed, "model": VARIANT, "lr": 0.0002, **params}
    data = {
        "rev": f"{seed:040x}",
        "timestamp": "2026-01-01T00:00:00",
        "params": {"params.yaml": {"data": {"prepare": {"dataset": "flickr30k"}, "train": train}}},
        "metrics": {EVAL_METRICS_FILE: {"data": metrics}}
        if metrics is not None
        else {EVAL_METRICS_FILE: {"error": {"type": "FileNotFoundError", "msg": "No such file"}}},
        "deps": {},
        "outs": {},
        "meta": {},
    }
    error = {"msg": "Experiment run failed", "type": ""} if state == "failed" else None
    executor = {"state": state, "name": None, "local": None} if state else None
    revs = [{"rev": data["rev"], "name": name, "data": data, "error": error, "experiments": None}]
    return {"revs": revs, "executor": executor, "name": name}


def _exp_show(experiments: list[dict], baseline: str = "a" * 40) -> list[dict]:
    workspace = {"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "error": None}
    commit = {"rev": baseline, "name": "main", "data": {"params": {}, "metrics": {}}, "error": None}
    return [{**workspace, "experiments": None}, {**commit, "experiments": experiments}]


def test_dvc_experiments_are_read_with_their_seeds(tmp_path: Path) -> None:
    exps = [_exp(f"seed-{s}", s, _fake_metrics(s)) for s in (2, 0, 1)]  # DVC lists the newest first
    exps += [_exp("seed-9", 9, None, state="queued"), _exp("seed-8", 8, None, state="failed")]
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(_exp_show(exps)))
    runs = runs_from_dvc_experiments(path)
    assert list(runs) == ["seed-0", "seed-1", "seed-2"]
    assert runs.seeds == {"seed-0": 0, "seed-1": 1, "seed-2": 2}
    assert (runs.dataset, runs.protocol, runs.variant) == ("flickr30k", "flickr30k_1k", VARIANT)
    assert runs.skipped["seed-9"] == "queued" and runs.skipped["seed-8"].startswith("failed")
    assert runs["seed-1"]["rsum"] == _fake_metrics(1)["rsum"]
    same = runs_from_dvc_experiments(path.read_text())  # the JSON text itself works too
    assert same.runs == runs.runs
    with pytest.raises(SpreadError, match=r"seed-8: failed"):
        runs_from_dvc_experiments(path, names=["seed-0", "seed-8"])
    with pytest.raises(SpreadError, match="no experiment named seed-5"):
        runs_from_dvc_experiments(path, names=["seed-5"])


def test_dvc_experiments_differing_in_params_are_refused(tmp_path: Path) -> None:
    exps = [_exp("seed-0", 0, _fake_metrics(0)), _exp("lr-high", 1, _fake_metrics(1), lr=0.001)]
    text = json.dumps(_exp_show(exps))
    with pytest.raises(SpreadError, match=r"differ in params other than train\.seed: train\.lr"):
        runs_from_dvc_experiments(text)
    assert len(runs_from_dvc_experiments(text, allow_differences=True)) == 2
    twice = _exp_show([_exp("seed-0", 0, _fake_metrics(0))])
    twice.append({**copy.deepcopy(twice[1]), "rev": "b" * 40})
    with pytest.raises(SpreadError, match="seed-0 appears under baselines aaaaaaa and bbbbbbb"):
        runs_from_dvc_experiments(json.dumps(twice))
    with pytest.raises(SpreadError, match="not valid JSON"):
        runs_from_dvc_experiments("{")
    with pytest.raises(SpreadError, match=r"no finished experiment with results/eval/metrics\.json"):
        runs_from_dvc_experiments(json.dumps(_exp_show([_exp("seed-0", 0, None)])))


def test_default_metrics_file_is_the_evaluate_stage_metrics() -> None:
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert [next(iter(entry)) for entry in stage["metrics"]] == [EVAL_METRICS_FILE]


# -- scan-pipe compare --spread ---------------------------------------------------------------------------


def _compare(*args: str | Path):
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_compare_spread_cli(seed_runs: dict[str, Path], tmp_path: Path) -> None:
    result = _compare("--spread", *seed_runs.values(), "--dataset", "flickr30k")
    assert result.exit_code == 0, result.output
    expected = _expected(seed_runs)
    rsum_line = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("rsum"))
    assert f"{np.mean(expected['rsum']):.2f} ± {np.std(expected['rsum'], ddof=1):.2f}" in rsum_line
    r1_line = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("i2t_r1 "))
    assert "67.9; seeds 65.6–66.8" in r1_line

    as_json = _compare("--spread", *seed_runs.values(), "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["kind"] == "spread" and report["runs"] == list(seed_runs)
    rows = {row["metric"]: row for row in report["rows"]}
    assert rows["t2i_r1"]["mean"] == pytest.approx(np.mean(expected["t2i_r1"]))
    assert rows["t2i_r1"]["paper"] is None  # no --dataset: no paper numbers, and a note says so
    assert any("dataset unknown" in note for note in report["notes"])

    exps = tmp_path / "exps.json"
    exps.write_text(json.dumps(_exp_show([_exp(f"seed-{s}", s, _fake_metrics(s)) for s in SEEDS])))
    from_dvc = _compare("--dvc-exps", exps, "--format", "json")
    assert from_dvc.exit_code == 0, from_dvc.output
    dvc_report = json.loads(from_dvc.stdout)
    assert dvc_report["seeds"] == {f"seed-{s}": s for s in SEEDS}
    assert {row["metric"]: row["mean"] for row in dvc_report["rows"]}["rsum"] == pytest.approx(
        np.mean(expected["rsum"])
    )
    assert dvc_report["rows"][0]["paper"] == 67.9  # the dataset comes from the experiments' params


def test_compare_spread_usage_errors(seed_runs: dict[str, Path], tmp_path: Path) -> None:
    runs = list(seed_runs.values())
    assert _compare(*runs[:3]).exit_code == 2  # three paths without --spread
    no_runs = _compare("--spread")
    assert no_runs.exit_code == 2 and "needs the runs" in no_runs.output
    both = _compare("--spread", runs[0], "--dvc-exps", tmp_path / "x.json")
    assert both.exit_code == 2 and "not both" in both.output
    stray = _compare(runs[0], runs[1], "--dataset", "flickr30k")
    assert stray.exit_code == 2 and "go with --spread" in stray.output
    missing = _compare("--spread", runs[0], tmp_path / "nope")
    assert missing.exit_code == 2 and "nope" in missing.output
    regular = _compare(runs[0], runs[0])  # the two-run comparison still works
    assert regular.exit_code == 0 and "no regression" in regular.output


# -- scan-pipe report --spread-eval ---------------------------------------------------------------------


def test_report_with_spread_evals(seed_runs: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from tests.test_report import _make_run, _required_options

    run = _make_run(tmp_path / "run", untrained=True)
    out = tmp_path / "report"
    spread_options = [item for folder in seed_runs.values() for item in ("--spread-eval", str(folder))]
    result = CliRunner().invoke(
        app,
        ["report", *_required_options(run, out), "--dataset", "flickr30k", "--num-examples", "0",
         *spread_options],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Seed spread", 1)[1].split("\n## ", 1)[0]
    expected = _expected(seed_runs)
    rsum_row = next(line for line in section.splitlines() if line.startswith("| rsum"))
    assert f"{np.mean(expected['rsum']):.2f} ± {np.std(expected['rsum'], ddof=1):.2f}" in rsum_row
    assert " 67.9 |" in next(line for line in section.splitlines() if line.startswith("| i2t_r1 "))
    assert "65.6–66.8" in section and "![" in section and "seed_spread.png" in section
    assert "Seed spread" in (out / "report.html").read_text()
    with Image.open(out / "seed_spread.png") as image:
        assert image.width > 400 and np.asarray(image.convert("L")).std() > 5

    without = CliRunner().invoke(app, ["report", *_required_options(run, tmp_path / "plain")])
    assert without.exit_code == 0 and "Seed spread" not in (tmp_path / "plain" / "report.md").read_text()
    bad = CliRunner().invoke(
        app, ["report", *_required_options(run, tmp_path / "bad"), "--spread-eval", str(tmp_path / "nope")]
    )
    assert bad.exit_code == 1 and "nope" in bad.output


# -- scan-pipe seeds --------------------------------------------------------------------------------------


class FakeDvc:
    """Answers the dvc commands run_seeds issues; `failing` seeds fail, queued ones finish one per poll."""

    def __init__(self, failing: Sequence[int] = ()) -> None:
        self.calls: list[list[str]] = []
        self.failing = set(failing)
        self.queued: list[int] = []
        self.polls = 0

    def __call__(self, args: Sequence[str], cwd: Path) -> tuple[int, str, str]:
        args = list(args)[1:]  # without the dvc executable
        self.calls.append(args)
        if args[:2] == ["exp", "run"]:
            seed = int(args[args.index("-S") + 1].split("=")[1])
            if "--queue" in args:
                self.queued.append(seed)
            elif seed in self.failing:
                return 255, "", "ERROR: failed to reproduce 'train': exited with 1\n"
            return 0, "", ""
        if args == ["queue", "start"]:
            return 0, "Started '1' new experiments task queue worker.", ""
        if args == ["exp", "show", "--json"]:
            self.polls += 1
            exps = []
            for index, seed in enumerate(self.queued):
                state = "success" if index < self.polls else "running" if index == self.polls else "queued"
                if state == "success" and seed in self.failing:
                    state = "failed"
                metrics = _fake_metrics(seed) if state == "success" else None
                exps.append(_exp(f"seed-{seed}", seed, metrics, state=state))
            if not self.queued:
                exps = [_exp(f"seed-{s}", s, _fake_metrics(s)) for s in (1, 2, 3)]
            return 0, json.dumps(_exp_show(exps)), ""
        raise AssertionError(f"unexpected dvc call {args}")


@pytest.fixture
def dvc_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".dvc").mkdir()
    monkeypatch.setattr(shutil, "which", lambda name: f"/fake/bin/{name}")
    return tmp_path


def test_run_seeds_sequential_calls_and_failure(dvc_project: Path) -> None:
    fake = FakeDvc()
    report = run_seeds([1, 2, 3], queue=False, repo_dir=dvc_project, extra_sets=["train.epochs=2"],
                       runner=fake, progress=False)  # fmt: skip
    assert fake.calls[0] == ["exp", "run", "-S", "train.seed=1", "-S", "train.epochs=2", "--name", "seed-1"]
    assert list(report.runs) == ["seed-1", "seed-2", "seed-3"] and report.paper is not None
    failing = FakeDvc(failing=[2])
    with pytest.raises(SeedRunError, match=r"seed 2: running experiment seed-2 failed \(exit 255\): ERROR"):
        run_seeds([1, 2, 3], queue=False, repo_dir=dvc_project, runner=failing, progress=False)
    assert len(failing.calls) == 2  # stopped at the failing seed
    assert "ERROR: failed to reproduce" in (dvc_project / ".dvc/tmp/seeds/seed-2.log").read_text()


def test_run_seeds_queue_waits_and_names_failed_seeds(dvc_project: Path) -> None:
    fake = FakeDvc()
    report = run_seeds([4, 5], queue=True, repo_dir=dvc_project, runner=fake, progress=False, poll_s=0)
    assert fake.calls[0][:4] == ["exp", "run", "--queue", "-S"] and ["queue", "start"] in fake.calls
    assert report.runs.seeds == {"seed-4": 4, "seed-5": 5}
    with pytest.raises(SeedRunError, match=r"seed\(s\) 5 failed in the queue"):
        run_seeds([4, 5], queue=True, repo_dir=dvc_project, runner=FakeDvc([5]), progress=False, poll_s=0)


def test_run_seeds_input_errors(dvc_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SeedRunError, match="given twice: 1"):
        run_seeds([1, 1], queue=False, repo_dir=dvc_project, runner=FakeDvc())
    with pytest.raises(SeedRunError, match="seeds come from --seeds"):
        run_seeds([1], queue=False, repo_dir=dvc_project, extra_sets=["train.seed=3"], runner=FakeDvc())
    with pytest.raises(SeedRunError, match="not a DVC repository"):
        run_seeds([1], queue=False, repo_dir=dvc_project / "elsewhere", runner=FakeDvc())
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = CliRunner().invoke(app, ["seeds", "--seeds", "0-2", "--repo", str(dvc_project)])
    assert result.exit_code == 1 and "dvc not found" in result.output
    bad = CliRunner().invoke(app, ["seeds", "--seeds", "a,b", "--repo", str(dvc_project)])
    assert bad.exit_code == 2 and "--seeds" in bad.output


@pytest.mark.slow  # real git + `dvc exp run` per seed in a throwaway project (a few seconds per seed)
def test_run_seeds_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("git") is None or shutil.which("dvc") is None:
        pytest.skip("git and dvc are needed")
    for variable, value in (("DVC_NO_ANALYTICS", "1"), ("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@t"),
                            ("GIT_COMMITTER_NAME", "t"), ("GIT_COMMITTER_EMAIL", "t@t")):  # fmt: skip
        monkeypatch.setenv(variable, value)
    code = (
        "import json, os, yaml; p = yaml.safe_load(open('params.yaml')); s = p['train']['seed']; "
        "os.makedirs('results/eval', exist_ok=True); "
        f"m = {{k: 10.0 * s + i for i, k in enumerate({list(METRIC_KEYS)!r})}}; "
        "m.update(protocol='flickr30k_1k', models=[p['train']['model']]); "
        "json.dump(m, open('results/eval/metrics.json', 'w'))"
    )
    stage = {
        "cmd": f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}",
        "params": ["train"],
        "metrics": [{EVAL_METRICS_FILE: {"cache": False}}],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"seed": 0, "model": VARIANT}}))
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "project"]):  # fmt: skip
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, env=os.environ)

    report = run_seeds([1, 2, 3], queue=False, repo_dir=tmp_path, progress=False)
    assert isinstance(report.runs, RunSet) and list(report.runs) == ["seed-1", "seed-2", "seed-3"]
    assert report.runs.seeds == {"seed-1": 1, "seed-2": 2, "seed-3": 3}
    for index, key in enumerate(METRIC_KEYS):
        values = np.array([10.0 * seed + index for seed in (1, 2, 3)])
        row = report.frame.loc[key]
        assert row["n"] == 3 and row["mean"] == pytest.approx(values.mean())
        assert row["std"] == pytest.approx(values.std(ddof=1))
    assert report.runs.variant == VARIANT and report.runs.dataset is None  # no prepare section here
