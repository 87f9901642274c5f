"""dvc.yaml wiring: deps cover exactly the code each stage imports; a change reruns exactly the right stages.

The rerun tests copy the repository's dvc.yaml, params.yaml and code into a fresh git + DVC repository,
replace every stage command with a cheap one that writes the declared outputs (deps, params and outs
unchanged), run `dvc repro`, make one change, and check which stages the next `dvc repro` runs.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

CODE_PACKAGES = ("pipeline", "extractors", "stages")
STAGE_ORDER = ("sample", "prepare", "extract", "tokenize", "train", "evaluate", "report")


def load_dvc_yaml(root: Path = REPO_ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def load_params_yaml(root: Path = REPO_ROOT) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def resolve_template(value: str, params: dict) -> str:
    """Substitute `${a.b}` references the way DVC does (params.yaml is the only vars source here)."""
    out = value
    while "${" in out:
        start = out.index("${")
        end = out.index("}", start)
        node = params
        for part in out[start + 2 : end].split("."):
            node = node[part]
        out = out[:start] + str(node) + out[end + 1 :]
    return out


def _path_entries(entries: list | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (plain strings or single-key mappings)."""
    paths = []
    for entry in entries or []:
        paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported_modules(path: Path, root: Path) -> set[str]:
    """Project modules a file imports (absolute and relative imports, including function-level ones)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # A relative import starts from the file's folder (for `__init__.py`, the package itself).
    package_parts = list(path.relative_to(root).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name.split(".")[0] in CODE_PACKAGES}


def import_closure(start: Path, root: Path = REPO_ROOT) -> set[str]:
    """Repository-relative POSIX paths of every project file `start` needs: transitive imports + packages."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path, root):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                target = _module_file(".".join(parts[:depth]), root)
                if target is not None and target not in seen:
                    todo.append(target)
    return {path.relative_to(root).as_posix() for path in seen}


def stage_command_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """`scan-pipe` command name -> file of the stage module registering it (`app.command("name")`).

    Read from the source rather than by importing the CLI, which would load torch (slow on a busy machine).
    """
    modules: dict[str, Path] = {}
    for path in sorted((root / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "command"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                modules[node.args[0].value] = path
    return modules


def _is_code_path(path: str) -> bool:
    """A module or package directory (data files shipped in a package, e.g. pipeline/resources/, are not)."""
    return path.split("/")[0] in CODE_PACKAGES and (path.endswith(".py") or path.endswith("/"))


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep.rstrip("/") or path.startswith(dep.rstrip("/") + "/") for dep in deps)


# -- static checks of dvc.yaml --------------------------------------------------------------------------


def test_pipeline_has_the_expected_stages() -> None:
    stages = load_dvc_yaml()["stages"]
    assert tuple(stages) == STAGE_ORDER
    for name, stage in stages.items():
        assert stage["cmd"].startswith("scan-pipe "), f"stage {name} does not call the scan-pipe CLI"
        assert "--params params.yaml" in stage["cmd"], f"stage {name} does not pass params.yaml"
        assert stage.get("params"), f"stage {name} declares no params section"


def test_every_dependency_exists() -> None:
    dvc = load_dvc_yaml()
    params = load_params_yaml()
    produced = {
        resolve_template(path, params)
        for stage in dvc["stages"].values()
        for key in ("outs", "metrics", "plots")
        for path in _path_entries(stage.get(key))
    }
    for name, stage in dvc["stages"].items():
        for dep in _path_entries(stage.get("deps")):
            dep = resolve_template(dep, params)
            if _covered(dep, sorted(produced)):
                continue  # made by an earlier stage
            assert (REPO_ROOT / dep).exists(), (
                f"stage {name}: dependency {dep} does not exist in the repository"
            )


def test_code_dependencies_are_exactly_the_imported_modules() -> None:
    dvc = load_dvc_yaml()
    commands = stage_command_modules()
    for name, stage in dvc["stages"].items():
        command = shlex.split(stage["cmd"])[1]
        assert command in commands, f"stage {name}: `scan-pipe {command}` is not a registered command"
        closure = import_closure(commands[command])
        code_deps = [dep for dep in _path_entries(stage.get("deps")) if _is_code_path(dep)]
        missing = sorted(path for path in closure if not _covered(path, code_deps))
        assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them in its deps"
        unused = sorted(dep for dep in code_deps if not any(_covered(path, [dep]) for path in closure))
        assert not unused, f"stage {name} lists {unused} in its deps but never imports them"


def test_report_depends_on_the_bundled_paper_numbers() -> None:
    deps = _path_entries(load_dvc_yaml()["stages"]["report"].get("deps"))
    assert "pipeline/resources/published_results.json" in deps


def test_each_stage_tracks_its_own_params_section() -> None:
    from pipeline.params import Params

    dvc = load_dvc_yaml()
    for name, stage in dvc["stages"].items():
        sections = [entry if isinstance(entry, str) else next(iter(entry)) for entry in stage["params"]]
        assert sections[0] == name, f"stage {name} should track its own params section first, got {sections}"
        unknown = [section for section in sections if section not in Params.model_fields]
        assert not unknown, f"stage {name} tracks params sections missing from the schema: {unknown}"
        if name != "report":  # the report shows every stage's configuration
            assert sections == [name], f"stage {name} should track only its own section, got {sections}"


def test_metrics_and_plots_are_declared() -> None:
    stages = load_dvc_yaml()["stages"]
    metrics = [entry for stage in stages.values() for entry in stage.get("metrics", [])]
    assert any(next(iter(entry)).endswith("metrics.json") for entry in metrics)
    assert all(isinstance(entry, dict) and next(iter(entry.values()))["cache"] is False for entry in metrics)
    top_level = load_dvc_yaml().get("plots", [])
    # DVC plots read json/csv/tsv/yaml files (not JSON lines): every plot names such files and its x field.
    plotted: list[tuple[str, str]] = []
    for entry in top_level:
        ((name, spec),) = entry.items()
        assert spec.get("x"), f"plot {name} needs an x field"
        for path, field in spec["y"].items():
            assert path.endswith((".json", ".csv", ".tsv", ".yaml")), f"plot {name}: DVC cannot plot {path}"
            plotted.append((path, str(field)))
    assert any("train_loss" in field for _, field in plotted), "no training-loss plot"
    assert any("val_rsum" in field for _, field in plotted), "no validation-rsum plot"
    assert any(path.endswith("recall_at_k.csv") for path, _ in plotted), "no recall@K plot"


# -- rerun behaviour in a scratch repository ------------------------------------------------------------

# Stand-in for every stage command: writes each declared output with a fresh random token, so whenever DVC
# runs a stage its outputs change and every stage downstream becomes stale (as a real rerun with changed
# inputs would do). The test then sees exactly which stages DVC's dependency tracking reruns.
FAKE_STAGE = """
import json, pathlib, sys, uuid

spec = json.loads(pathlib.Path("fake_spec.json").read_text())[sys.argv[1]]
record = json.dumps({"epoch": 1, "train_loss": 1.0, "val_rsum": 1.0, "token": uuid.uuid4().hex})
for path in spec["files"]:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record + "\\n")
for path in spec["dirs"]:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "token.json").write_text(record + "\\n")
"""


def _fake_spec(dvc: dict, params: dict) -> dict:
    """Per stage: resolved deps, params sections, output files and directories to create."""
    consumed = [
        resolve_template(dep, params) for s in dvc["stages"].values() for dep in _path_entries(s.get("deps"))
    ]
    spec = {}
    for name, stage in dvc["stages"].items():  # outputs only: what the stand-in command has to create
        files, dirs = [], []
        for key in ("outs", "metrics", "plots"):
            for out in _path_entries(stage.get(key)):
                out = resolve_template(out, params)
                inner = [dep for dep in consumed if dep.startswith(out + "/")]
                if Path(out).suffix and not inner:
                    files.append(out)
                else:
                    dirs.append(out)
                    files.extend(dep for dep in inner if Path(dep).suffix)
                    dirs.extend(dep for dep in inner if not Path(dep).suffix)
        spec[name] = {"files": files, "dirs": dirs}
    return spec


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _repro(root: Path) -> list[str]:
    """`dvc repro`, in-process (the CLI's start-up would dominate): the stages that actually ran, in order."""
    from dvc.repo import Repo

    previous = Path.cwd()
    os.chdir(root)  # stage commands and relative paths resolve against the working directory
    try:
        with Repo(str(root)) as dvc_repo:
            return [stage.name for stage in dvc_repo.reproduce()]
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or shutil.which("dvc") is None:
        pytest.skip("git and dvc are needed for the rerun tests")
    root = tmp_path_factory.mktemp("wiring")
    for package in CODE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    params = load_params_yaml(root)
    dvc = load_dvc_yaml()
    (root / "fake_spec.json").write_text(json.dumps(_fake_spec(dvc, params)))
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    for name, stage in dvc["stages"].items():
        stage["cmd"] = f"{shlex.quote(sys.executable)} fake_stage.py {name}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    (root / ".gitignore").write_text("__pycache__/\n")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    assert _repro(root) == list(STAGE_ORDER)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-q", "-m", "baseline"], root)
    return root


@pytest.fixture
def repo(scratch_repo: Path):
    """The scratch repository; a test changes one input and records the stages it expects in `expected`.

    Afterwards the change is undone: the next `dvc repro` must rerun the same stages to get back.
    """
    params = scratch_repo / "params.yaml"
    scan = scratch_repo / "pipeline" / "models" / "scan.py"
    originals = {path: path.read_bytes() for path in (params, scan)}
    expected: list[str] = []
    yield scratch_repo, expected
    for path, content in originals.items():
        path.write_bytes(content)
    assert _repro(scratch_repo) == expected


def _set_param(root: Path, section: str, key: str, value: object) -> None:
    params = load_params_yaml(root)
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _expect(expected: list[str], stages: list[str]) -> list[str]:
    expected.extend(stages)
    return stages


@pytest.mark.slow  # runs `dvc repro` in a scratch repository
def test_unchanged_pipeline_reruns_nothing(repo: tuple[Path, list[str]]) -> None:
    root, _ = repo
    assert _repro(root) == []


@pytest.mark.slow  # runs `dvc repro` in a scratch repository
def test_lambda_softmax_reruns_train_evaluate_report(repo: tuple[Path, list[str]]) -> None:
    root, expected = repo
    _set_param(root, "train", "lambda_softmax", 4.0)
    assert _repro(root) == _expect(expected, ["train", "evaluate", "report"])


@pytest.mark.slow  # runs `dvc repro` in a scratch repository
def test_test_scale_reruns_extract_and_downstream(repo: tuple[Path, list[str]]) -> None:
    root, expected = repo
    _set_param(root, "extract", "test_scale", 256)
    assert _repro(root) == _expect(expected, ["extract", "train", "evaluate", "report"])


@pytest.mark.slow  # runs `dvc repro` in a scratch repository
def test_report_param_reruns_report_only(repo: tuple[Path, list[str]]) -> None:
    root, expected = repo
    _set_param(root, "report", "top_k", 5)
    assert _repro(root) == _expect(expected, ["report"])


@pytest.mark.slow  # runs `dvc repro` in a scratch repository
def test_model_code_change_reruns_train_and_downstream(repo: tuple[Path, list[str]]) -> None:
    root, expected = repo
    scan = root / "pipeline" / "models" / "scan.py"
    scan.write_text(scan.read_text() + "\n# changed\n")
    assert _repro(root) == _expect(expected, ["train", "evaluate", "report"])
