"""Runs of the official SCAN code imported and evaluated: `evalrank`'s numbers, ensembles and every refusal.

Targets come from `../shared/fixtures/scan_official` (its README: §2.4 evaluation, §3 the checkpoint, §4
loading without unpickling, §9 tolerances). Every checkpoint folder of the fixture is evaluated, so the hidden
variant (other sizes, the one-row-per-caption `.npy` layout) runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.checkpoint import load_checkpoint, read_checkpoint_info
from pipeline.evaluation import evaluate_run
from pipeline.metrics import retrieval_metrics
from pipeline.official_checkpoint import OfficialCheckpointError, read_official_checkpoint
from pipeline.official_import import OfficialImportError, import_official
from pipeline.precomp import import_precomp
from pipeline.vocab import OFFICIAL_TOKENIZER
from stages.cli import app

pytestmark = pytest.mark.usefixtures("single_torch_thread")

METRIC_ORDER = ("r1", "r5", "r10", "medr", "meanr")


def _runs(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "runs").iterdir() if (path / "model_best.pth.tar").is_file())


def _expected(root: Path, run: str) -> dict[str, np.ndarray]:
    """`evalrank`'s output for a run; the legacy copy shares the output of the run it copies (README §2.2)."""
    path = root / "expected" / f"eval_{run}.npz"
    if not path.is_file():
        manifest = json.loads((root / "manifest.json").read_text())
        path = root / "expected" / f"eval_{manifest['legacy_copy_of']}.npz"
    return dict(np.load(path))


def _checkpoint(root: Path, run: str) -> Path:
    return root / "runs" / run / "model_best.pth.tar"


def _vocab(root: Path) -> Path:
    (vocab,) = sorted((root / "vocab").glob("*_vocab.json"))
    return vocab


@pytest.fixture(scope="module")
def precomp_test_split(
    scan_official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The fixture's test split imported with `import-precomp` (feature store, captions table)."""
    (data_dir,) = sorted(path for path in (scan_official_fixtures / "data").iterdir() if path.is_dir())
    out = tmp_path_factory.mktemp("precomp") / "test_store"
    result = import_precomp(data_dir, "test", out, progress=False)
    return result.store_dir, result.captions_path


@pytest.fixture(scope="module")
def imported(scan_official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every official checkpoint of the fixture, imported once."""
    root = tmp_path_factory.mktemp("imported")
    return {
        run: import_official(
            _checkpoint(scan_official_fixtures, run), _vocab(scan_official_fixtures), root / run
        ).out_dir
        for run in _runs(scan_official_fixtures)
    }


def _official_metrics(expected: dict[str, np.ndarray]) -> dict[str, float]:
    metrics = {f"i2t_{key}": float(value) for key, value in zip(METRIC_ORDER, expected["i2t_r"], strict=True)}
    metrics.update({f"t2i_{key}": float(v) for key, v in zip(METRIC_ORDER, expected["t2i_r"], strict=True)})
    metrics["rsum"] = float(expected["rsum"])
    return metrics


def test_every_fixture_run_is_checked(scan_official_fixtures: Path) -> None:
    runs = _runs(scan_official_fixtures)
    assert len(runs) >= 3, runs
    formats = {read_official_checkpoint(_checkpoint(scan_official_fixtures, run)).layout for run in runs}
    assert formats == {"zip", "legacy"}


def test_import_records_model_vocabulary_and_tokenizer(
    scan_official_fixtures: Path, imported: dict[str, Path]
) -> None:
    manifest = json.loads((scan_official_fixtures / "manifest.json").read_text())
    vocab_bytes = _vocab(scan_official_fixtures).read_bytes()
    for run, out in imported.items():
        info = read_checkpoint_info(out)
        opt = manifest["configs"][run.removesuffix("_legacy")]["opt"]
        assert info.tokenizer == OFFICIAL_TOKENIZER
        assert info.vocab_path is not None and info.vocab_path.read_bytes() == vocab_bytes
        config = info.model_config
        assert config["direction"] == opt["cross_attn"]
        assert config["agg"] == opt["agg_func"]
        assert config["bidirectional"] == opt["bi_gru"]
        for key in ("embed_size", "word_dim", "img_dim", "vocab_size", "num_layers", "lambda_softmax"):
            assert config[key] == opt[key], key
        assert info.extra["official_training_options"]["margin"] == opt["margin"]
        assert not info.has_optimizer
        # the weights are the file's, exactly
        official = read_official_checkpoint(_checkpoint(scan_official_fixtures, run))
        model, _ = load_checkpoint(out)
        state = model.state_dict()
        for name, tensor in official.text_state.items():
            assert torch.equal(state[f"text_encoder.{name}"], tensor.float()), name
        for name, tensor in official.image_state.items():
            assert torch.equal(state[f"image_encoder.{name}"], tensor.float()), name


@pytest.mark.parametrize("index", range(3))
def test_evaluation_equals_evalrank(
    index: int,
    scan_official_fixtures: Path,
    imported: dict[str, Path],
    precomp_test_split: tuple[Path, Path],
) -> None:
    run = _runs(scan_official_fixtures)[index]
    expected = _expected(scan_official_fixtures, run)
    store, captions = precomp_test_split
    result = evaluate_run(
        [imported[run]], store, captions, protocol="flickr30k_1k", device="cpu", progress=False
    )
    np.testing.assert_allclose(result.scores, expected["sims"], rtol=1e-5, atol=1e-6)
    official = _official_metrics(expected)
    for key, value in official.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_array_equal(result.ranks.i2t_ranks, expected["i2t_ranks"].astype(np.int64))
    np.testing.assert_array_equal(result.ranks.t2i_ranks, expected["t2i_ranks"].astype(np.int64))
    np.testing.assert_array_equal(result.ranks.i2t_top1, expected["i2t_top1"].astype(np.int64))
    np.testing.assert_array_equal(result.ranks.t2i_top1, expected["t2i_top1"].astype(np.int64))


@pytest.mark.parametrize("index", range(3))
def test_embeddings_float32_and_float64(
    index: int, scan_official_fixtures: Path, imported: dict[str, Path]
) -> None:
    """The encoders from the checkpoint's weights: float32 within 1e-6, float64 within 1e-12 (README §9)."""
    from pipeline.official_vocab import OfficialVocabulary

    run = _runs(scan_official_fixtures)[index]
    expected = _expected(scan_official_fixtures, run)
    (data_dir,) = sorted(path for path in (scan_official_fixtures / "data").iterdir() if path.is_dir())
    features = np.load(data_dir / "test_ims.npy")
    lines = (data_dir / "test_caps.txt").read_bytes().split(b"\n")[: expected["cap_lens"].shape[0]]
    vocab = OfficialVocabulary.load(_vocab(scan_official_fixtures))
    ids = [vocab.encode(line.decode("utf-8")) for line in lines]
    lengths = torch.tensor([len(row) for row in ids])
    np.testing.assert_array_equal(lengths.numpy(), expected["cap_lens"])
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, caption in enumerate(ids):
        tokens[row, : len(caption)] = torch.tensor(caption)
    step = features.shape[0] // expected["img_embs"].shape[0]  # 5 in the one-row-per-caption layout
    images = torch.from_numpy(np.ascontiguousarray(features[::step]))
    model, _ = load_checkpoint(imported[run])
    with torch.no_grad():
        np.testing.assert_allclose(
            model.encode_images(images).numpy(), expected["img_embs"], atol=1e-6, rtol=0
        )
        np.testing.assert_allclose(
            model.encode_captions(tokens, lengths).numpy(), expected["cap_embs"], atol=1e-6, rtol=0
        )
        model64 = model.double()
        img64 = model64.encode_images(images.double())
        cap64 = model64.encode_captions(tokens, lengths)
        np.testing.assert_allclose(img64.numpy(), expected["img_embs_fp64model"], atol=1e-12, rtol=0)
        np.testing.assert_allclose(cap64.numpy(), expected["cap_embs_fp64model"], atol=1e-12, rtol=0)
        sims64 = model64.similarity(img64, cap64, lengths).numpy()
    np.testing.assert_allclose(sims64, expected["sims_fp64model"], rtol=1e-9, atol=0)


def test_ensemble_averages_the_score_matrices(
    scan_official_fixtures: Path, imported: dict[str, Path], precomp_test_split: tuple[Path, Path]
) -> None:
    zips = [run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy")][:2]
    store, captions = precomp_test_split
    result = evaluate_run([imported[run] for run in zips], store, captions, device="cpu", progress=False)
    official = np.mean([_expected(scan_official_fixtures, run)["sims"] for run in zips], axis=0)
    np.testing.assert_allclose(result.scores, official, rtol=1e-5, atol=1e-6)
    for key, value in retrieval_metrics(official).items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    assert result.metrics["models"] == [read_checkpoint_info(imported[run]).model_name for run in zips]


def test_cli_flow_as_the_readme_shows(scan_official_fixtures: Path, tmp_path: Path) -> None:
    """import-precomp -> import-official -> evaluate (one checkpoint, then an ensemble) from the CLI."""
    (data_dir,) = sorted(path for path in (scan_official_fixtures / "data").iterdir() if path.is_dir())
    runner = CliRunner()
    store = tmp_path / "features" / "test"
    result = runner.invoke(
        app,
        ["import-precomp", "--data", str(data_dir), "--split", "test", "--out", str(store), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    runs = [run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy")][:2]
    for run in runs:
        result = runner.invoke(
            app,
            [
                "import-official",
                str(_checkpoint(scan_official_fixtures, run)),
                "--vocab",
                str(_vocab(scan_official_fixtures)),
                "--out",
                str(tmp_path / "runs" / run),
            ],
        )
        assert result.exit_code == 0, result.output
    captions = store.with_name("test.captions.parquet")
    first = runs[0]
    args = [
        "evaluate",
        "--features",
        str(store),
        "--captions",
        str(captions),
        "--device",
        "cpu",
        "--no-progress",
    ]
    result = runner.invoke(
        app, [*args, "--checkpoint", str(tmp_path / "runs" / first), "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key, value in _official_metrics(_expected(scan_official_fixtures, first)).items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    ensemble = [arg for run in runs for arg in ("--checkpoint", str(tmp_path / "runs" / run))]
    result = runner.invoke(app, [*args, *ensemble, "--out", str(tmp_path / "ens")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["models"] == [
        read_checkpoint_info(tmp_path / "runs" / run).model_name for run in runs
    ]


# ------------------------------------------------------------------------------------------------ refusals


def _load_official(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _variant(
    scan_official_fixtures: Path, tmp_path: Path, *, name: str = "variant.pth.tar", **opt_changes
) -> Path:
    """The first zip checkpoint with `opt` fields changed (None deletes), saved by torch as train.py would."""
    run = next(run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy"))
    checkpoint = _load_official(_checkpoint(scan_official_fixtures, run))
    opt = vars(checkpoint["opt"])
    for key, value in opt_changes.items():
        if value is None:
            opt.pop(key, None)
        else:
            opt[key] = value
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def assert_import_fails(checkpoint: Path, vocab: Path, out: Path, *needles: str) -> str:
    with pytest.raises((OfficialImportError, OfficialCheckpointError)) as caught:
        import_official(checkpoint, vocab, out)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not out.exists(), "nothing may be left behind by a refused import"
    return message


def test_refuses_options_it_cannot_represent(scan_official_fixtures: Path, tmp_path: Path) -> None:
    vocab, out = _vocab(scan_official_fixtures), tmp_path / "out"
    weight_norm = _variant(scan_official_fixtures, tmp_path, precomp_enc_type="weight_norm")
    assert_import_fails(weight_norm, vocab, out, str(weight_norm), "precomp_enc_type", "weight_norm")
    unknown = _variant(scan_official_fixtures, tmp_path, name="u.pth.tar", use_restval=True)
    assert_import_fails(unknown, vocab, out, str(unknown), "use_restval")
    assert import_official(unknown, vocab, out, ignore_options=("use_restval",)).out_dir == out
    missing = _variant(scan_official_fixtures, tmp_path, name="m.pth.tar", cross_attn=None)
    assert_import_fails(missing, vocab, tmp_path / "o2", str(missing), "cross_attn")
    wrong_type = _variant(scan_official_fixtures, tmp_path, name="t.pth.tar", embed_size="16")
    assert_import_fails(wrong_type, vocab, tmp_path / "o3", "opt.embed_size", "expected int")
    bad_value = _variant(scan_official_fixtures, tmp_path, name="b.pth.tar", agg_func="Median")
    assert_import_fails(bad_value, vocab, tmp_path / "o4", "agg_func", "Median")


def test_refuses_weights_that_do_not_fit_opt(scan_official_fixtures: Path, tmp_path: Path) -> None:
    run = next(run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy"))
    opt = vars(_load_official(_checkpoint(scan_official_fixtures, run))["opt"])
    wider = _variant(scan_official_fixtures, tmp_path, embed_size=opt["embed_size"] * 2)
    assert_import_fails(
        wider, _vocab(scan_official_fixtures), tmp_path / "out", str(wider), "fc.weight", "shape"
    )


def test_refuses_a_vocabulary_of_another_size(scan_official_fixtures: Path, tmp_path: Path) -> None:
    document = json.loads(_vocab(scan_official_fixtures).read_text())
    document["word2idx"]["zzz-extra-word"] = len(document["word2idx"])
    document["idx2word"][str(len(document["idx2word"]))] = "zzz-extra-word"
    document["idx"] = len(document["word2idx"])
    vocab = tmp_path / "other_vocab.json"
    vocab.write_text(json.dumps(document))
    run = _runs(scan_official_fixtures)[0]
    assert_import_fails(
        _checkpoint(scan_official_fixtures, run), vocab, tmp_path / "out", str(vocab), "vocab_size"
    )


def test_refuses_files_that_are_not_official_checkpoints(
    scan_official_fixtures: Path, tmp_path: Path
) -> None:
    vocab, out = _vocab(scan_official_fixtures), tmp_path / "out"
    random_bytes = tmp_path / "random.pth.tar"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_import_fails(random_bytes, vocab, out, str(random_bytes), "not an official SCAN checkpoint")
    plain_state = tmp_path / "state_dict.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain_state)
    assert_import_fails(plain_state, vocab, out, str(plain_state), "missing key")
    assert_import_fails(tmp_path / "absent.pth.tar", vocab, out, "not found")


def _rewrite_zip(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, edit(info.filename, archive.read(info.filename)))
    return target


def test_refuses_a_foreign_global_without_executing_it(scan_official_fixtures: Path, tmp_path: Path) -> None:
    run = next(run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy"))
    marker = tmp_path / "executed"
    hostile = _rewrite_zip(
        _checkpoint(scan_official_fixtures, run),
        tmp_path / "hostile.pth.tar",
        lambda name, data: (
            data.replace(b"argparse\nNamespace\n", b"os\nsystem\n") if name.endswith("data.pkl") else data
        ),
    )
    message = assert_import_fails(
        hostile, _vocab(scan_official_fixtures), tmp_path / "out", str(hostile), "os.system"
    )
    assert "executed" in message  # "nothing in the file was executed"
    assert not marker.exists()


def test_refuses_storages_larger_than_the_file(scan_official_fixtures: Path, tmp_path: Path) -> None:
    runs = _runs(scan_official_fixtures)
    zipped = next(run for run in runs if not run.endswith("_legacy"))
    truncated_record = _rewrite_zip(
        _checkpoint(scan_official_fixtures, zipped),
        tmp_path / "short.pth.tar",
        lambda name, data: data[: len(data) // 2] if name.endswith("/data/0") else data,
    )
    with pytest.raises(OfficialCheckpointError, match=r"declares .* bytes but its zip record holds"):
        read_official_checkpoint(truncated_record)
    legacy = next(run for run in runs if run.endswith("_legacy"))
    data = _checkpoint(scan_official_fixtures, legacy).read_bytes()
    cut = tmp_path / "cut_legacy.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialCheckpointError, match=str(cut).replace(".", r"\.")):
        read_official_checkpoint(cut)


def test_refuses_to_replace_an_existing_output(scan_official_fixtures: Path, tmp_path: Path) -> None:
    run = _runs(scan_official_fixtures)[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OfficialImportError, match="already holds"):
        import_official(_checkpoint(scan_official_fixtures, run), _vocab(scan_official_fixtures), out)
    with pytest.raises(OfficialImportError, match="not a checkpoint directory"):
        import_official(
            _checkpoint(scan_official_fixtures, run), _vocab(scan_official_fixtures), out, overwrite=True
        )
    assert (out / "notes.txt").read_text() == "mine"


def test_two_layer_gru_is_the_official_stacked_gru(scan_official_fixtures: Path, tmp_path: Path) -> None:
    """num_layers > 1 (not in the fixture): the imported text encoder equals torch's stacked GRU, packed."""
    run = next(run for run in _runs(scan_official_fixtures) if not run.endswith("_legacy"))
    checkpoint = _load_official(_checkpoint(scan_official_fixtures, run))
    opt = vars(checkpoint["opt"])
    opt["num_layers"] = 2
    torch.manual_seed(0)
    gru = torch.nn.GRU(opt["word_dim"], opt["embed_size"], 2, batch_first=True, bidirectional=opt["bi_gru"])
    text_state = checkpoint["model"][1]
    for key in list(text_state):
        if key.startswith("rnn."):
            del text_state[key]
    text_state.update({f"rnn.{key}": value for key, value in gru.state_dict().items()})
    path = tmp_path / "two_layers.pth.tar"
    torch.save(checkpoint, path)
    model, _ = load_checkpoint(
        import_official(path, _vocab(scan_official_fixtures), tmp_path / "out").out_dir
    )
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        ours = model.encode_captions(tokens, lengths)
        words = torch.nn.functional.embedding(tokens, text_state["embed.weight"])
        for row, length in enumerate(lengths.tolist()):
            output, _ = gru(words[row : row + 1, :length])
            if opt["bi_gru"]:
                output = (output[..., : opt["embed_size"]] + output[..., opt["embed_size"] :]) / 2
            output = output / (output.norm(dim=-1, keepdim=True) + 1e-8)
            torch.testing.assert_close(ours[row, :length], output[0], atol=1e-6, rtol=0)
            assert torch.all(ours[row, length:] == 0)


def test_scan_declares_exactly_the_tensors_storages(scan_official_fixtures: Path) -> None:
    """The scan reads the real pickles and returns their storages; sizes equal the tensors' bytes."""
    from pipeline.official_checkpoint import _declared_storages

    for run in _runs(scan_official_fixtures):
        path = _checkpoint(scan_official_fixtures, run)
        layout, storages = _declared_storages(path, path.read_bytes())
        official = read_official_checkpoint(path)
        tensors = [*official.image_state.values(), *official.text_state.values()]
        assert layout == official.layout
        assert sum(s.nbytes for s in storages) == sum(t.numel() * t.element_size() for t in tensors)
        assert path.stat().st_size >= sum(s.nbytes for s in storages)
