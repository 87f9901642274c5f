"""Several seeds of one configuration as one command: a DVC experiment per seed, then their spread.

Each seed runs as `dvc exp run -S train.seed=N --name seed-N` (the pipeline reruns from `train` on), one
after the other in the workspace, or queued (`dvc exp run --queue`, then `dvc queue start`) to run in
temporary copies while this process waits. The experiments stay in DVC (`dvc exp show`, `dvc exp apply
seed-N`); the spread is read back from `dvc exp show --json`. DVC is called as a subprocess with argument
lists, so its own CLI, config and locking apply exactly as when a user types the commands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.spread import (
    EVAL_METRICS_FILE,
    SEED_PARAM,
    SpreadReport,
    build_spread,
    runs_from_dvc_experiments,
)

# Runs a command in a folder and returns (exit status, stdout, stderr); tests replace it.
Runner = Callable[[Sequence[str], Path], tuple[int, str, str]]
QUEUE_POLL_S = 5.0
LOG_DIR = Path(".dvc") / "tmp" / "seeds"  # DVC's scratch folder: ignored by git and by DVC


class SeedRunError(UserError):
    """dvc is missing, an option is wrong, or a seed's experiment failed; the message names the seed."""


def experiment_name(seed: int) -> str:
    """The DVC experiment name of one seed's run."""
    return f"seed-{seed}"


def _subprocess_runner(args: Sequence[str], cwd: Path) -> tuple[int, str, str]:
    completed = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)
    return completed.returncode, completed.stdout, completed.stderr


def _last_error_line(stdout: str, stderr: str) -> str:
    """DVC's own one-line reason (its last `ERROR:` line), else the last line it printed."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def _check_inputs(seeds: Sequence[int], extra_sets: Sequence[str], repo: Path) -> None:
    if not seeds:
        raise SeedRunError("no seeds given")
    duplicates = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if duplicates:
        raise SeedRunError(f"seed(s) given twice: {', '.join(map(str, duplicates))}")
    for item in extra_sets:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise SeedRunError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=30")
        if key.strip().split(":")[-1] == SEED_PARAM:
            raise SeedRunError(f"--set {item!r}: the seeds come from --seeds, not --set")
    if not (repo / ".dvc").is_dir():
        raise SeedRunError(f"{repo}: not a DVC repository (no .dvc folder)")


def _exp_run_args(dvc: str, seed: int, extra_sets: Sequence[str], *, queue: bool, force: bool) -> list[str]:
    args = [dvc, "exp", "run", *(["--queue"] if queue else []), "-S", f"{SEED_PARAM}={seed}"]
    for item in extra_sets:
        args += ["-S", item]
    return [*args, "--name", experiment_name(seed), *(["-f"] if force else [])]


def _write_log(repo: Path, seed: int, stdout: str, stderr: str) -> Path:
    """Keep a seed's full DVC output for when its one-line error is not enough."""
    path = repo / LOG_DIR / f"{experiment_name(seed)}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stdout + ("\n" + stderr if stderr else ""))
    return path


def _exp_show(dvc: str, repo: Path, runner: Runner) -> str:
    status, stdout, stderr = runner([dvc, "exp", "show", "--json"], repo)
    if status != 0:
        raise SeedRunError(f"dvc exp show failed (exit {status}): {_last_error_line(stdout, stderr)}")
    return stdout


def _queue_states(dvc: str, repo: Path, names: Sequence[str], runner: Runner) -> dict[str, str]:
    """Each named experiment's state from `dvc exp show --json`: queued, running, failed or done."""
    stdout = _exp_show(dvc, repo, runner)
    states = dict.fromkeys(names, "queued")  # not listed yet: still entering the queue
    try:
        baselines = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise SeedRunError(f"dvc exp show --json printed no JSON: {exc}") from exc
    for baseline in baselines:
        for group in baseline.get("experiments") or []:
            name = group.get("name")
            if name not in states:
                continue
            executor = group.get("executor") or {}
            errored = any(rev.get("error") for rev in group.get("revs") or [])
            state = executor.get("state") or "done"
            states[name] = "failed" if errored or state == "failed" else state
    return {name: "done" if state == "success" else state for name, state in states.items()}


def run_seeds(
    seeds: Sequence[int],
    *,
    queue: bool,
    repo_dir: str | Path = ".",
    extra_sets: Sequence[str] = (),
    force: bool = False,
    metrics_file: str = EVAL_METRICS_FILE,
    progress: bool = True,
    runner: Runner | None = None,
    poll_s: float = QUEUE_POLL_S,
) -> SpreadReport:
    """Run one DVC experiment per seed (`seed-N`), then return their spread beside the paper.

    `extra_sets` are further `-S KEY=VALUE` params for every seed (e.g. `train.epochs=30`); `force`
    overwrites existing `seed-N` experiments (`dvc exp run -f`). Sequential runs stop at the first failure;
    queued ones all run, and every failed seed is named afterwards.
    """
    repo = Path(repo_dir)
    _check_inputs(seeds, extra_sets, repo)
    dvc = shutil.which("dvc")
    if dvc is None:
        raise SeedRunError("dvc not found on PATH: install scan-pipe's dependencies (pip install -e .)")
    run = runner or _subprocess_runner
    names = [experiment_name(seed) for seed in seeds]
    with progress_bar("run", disable=not progress) as bar:
        task = bar.add_task("seeds", total=len(seeds), info="")
        for seed in seeds:
            if not queue:
                bar.update(task, info=f"seed {seed}: dvc exp run")
            status, stdout, stderr = run(_exp_run_args(dvc, seed, extra_sets, queue=queue, force=force), repo)
            if status != 0:
                log = _write_log(repo, seed, stdout, stderr)
                verb = "queueing" if queue else "running"
                reason = _last_error_line(stdout, stderr)
                if "conflicts with existing experiment" in reason:
                    reason = (
                        f"experiment {experiment_name(seed)} exists already (force=True / --force reruns it)"
                    )
                raise SeedRunError(
                    f"seed {seed}: {verb} experiment {experiment_name(seed)} failed (exit {status}): "
                    f"{reason} (full output: {log})"
                )
            if not queue:
                bar.advance(task)
        if queue:
            status, stdout, stderr = run([dvc, "queue", "start"], repo)
            if status != 0:
                raise SeedRunError(
                    f"dvc queue start failed (exit {status}): {_last_error_line(stdout, stderr)}"
                )
            while True:
                states = _queue_states(dvc, repo, names, run)
                finished = [name for name, state in states.items() if state in ("done", "failed")]
                running = [name for name, state in states.items() if state == "running"]
                bar.update(
                    task, completed=len(finished), info=f"running {', '.join(running)}" if running else ""
                )
                if len(finished) == len(names):
                    break
                time.sleep(poll_s)
            failed = [seed for seed, name in zip(seeds, names, strict=True) if states[name] == "failed"]
            if failed:
                listed = ", ".join(map(str, failed))
                raise SeedRunError(
                    f"seed(s) {listed} failed in the queue; see `dvc queue logs seed-N` for each"
                )
    return build_spread(runs_from_dvc_experiments(_exp_show(dvc, repo, run), metrics_file, names=names))
