"""params.yaml schema: the repository's file validates; wrong keys and values are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.params import ParamsError, load_params, load_section
from stages.cli import app
from tests.conftest import REPO_ROOT


def _repo_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _write_with(tmp_path: Path, section: str, key: str, value: object) -> Path:
    params = _repo_params()
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_repository_params_validate() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    raw = _repo_params()
    assert set(raw) == set(type(params).model_fields), "params.yaml should spell out every section"
    for section, values in raw.items():
        assert getattr(params, section).model_dump(include=set(values)) == values


def test_sample_run_says_its_detector_is_untrained() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.extract.weights == "random"
    assert "UNTRAINED" in (REPO_ROOT / "params.yaml").read_text()


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("train", "lamda_softmax", 9.0, "train.lamda_softmax"),
        ("train", "lr", -1, "train.lr"),
        ("extract", "boxes", 37, "extract.boxes"),
        ("prepare", "dataset", "flickr8k", "prepare.dataset"),
        ("sample", "num_train", 0, "sample.num_train"),
        ("tokenize", "min_count", "four", "tokenize.min_count"),
    ],
)
def test_wrong_key_or_value_names_it(
    tmp_path: Path, section: str, key: str, value: object, named: str
) -> None:
    path = _write_with(tmp_path, section, key, value)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message
    assert named in message


def test_wrong_value_in_another_section_is_caught_by_load_section(tmp_path: Path) -> None:
    path = _write_with(tmp_path, "train", "lr", -1)
    with pytest.raises(ParamsError, match=r"train\.lr"):
        load_section(path, "tokenize")


def test_unknown_section_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    params = _repo_params()
    params["trian"] = {"lr": 1}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="trian"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    "command",
    [
        ["tokenize", "--captions", "{tmp}/absent.parquet", "--out", "{tmp}/out/vocab.json"],
        ["sample", "--out", "{tmp}/out"],
        ["prepare", "--dataset-json", "{tmp}/absent.json", "--images", "{tmp}", "--out", "{tmp}/out"],
    ],
)
def test_stage_command_fails_on_bad_params_before_any_work(tmp_path: Path, command: list[str]) -> None:
    path = _write_with(tmp_path, "train", "lamda_softmax", 9.0)
    args = [part.replace("{tmp}", str(tmp_path)) for part in command]
    result = CliRunner().invoke(app, [*args, "--params", str(path)])
    assert result.exit_code == 2, result.output
    assert "train.lamda_softmax" in result.output
    assert "absent" not in result.output  # failed on the params, before looking at any input
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
