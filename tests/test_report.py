"""Report generation on a tiny synthetic run: files, recall/chance tables, paper numbers, untrained notice."""

from __future__ import annotations

import dataclasses
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.captions import read_captions, write_captions
from pipeline.errors import UserError
from pipeline.metrics import (
    evaluate_protocol,
    ranks_table,
    retrieval_ranks,
    write_metrics_json,
    write_ranks_parquet,
)
from pipeline.params import ReportParams
from pipeline.report import ReportError, ReportInputs, ReportSources, build_report, load_inputs
from pipeline.report.chance import chance_metrics, recall_curve
from pipeline.report.inputs import read_metrics
from pipeline.report.published import load_published_results, published_rows
from pipeline.store import RegionRecord
from pipeline.store_writer import FeatureStoreWriter
from pipeline.training_log import EpochRecord, append_epoch, read_training_log

N_IMAGES = 6
CPI = 5


def _make_run(root: Path, *, untrained: bool) -> dict[str, Path]:
    """Images, captions, a feature store, metrics.json, ranks.parquet and metrics.jsonl of a fake run."""
    rng = np.random.default_rng(3)
    images = root / "images"
    images.mkdir(parents=True)
    image_ids = []
    for i in range(N_IMAGES):
        array = np.full((90 + 10 * i, 120, 3), 40 * i, dtype=np.uint8)
        array[20:60, 30:90] = (200, 60 + 20 * i, 30)
        image_id = f"scene_{i:02d}.jpg"
        Image.fromarray(array).save(images / image_id, quality=90)
        image_ids.append(image_id)
    captions = [
        f"a {colour} square number {i} variant {j}" for i, colour in enumerate("abcdef") for j in range(CPI)
    ]
    caption_ids = [image_ids[j // CPI] for j in range(len(captions))]
    write_captions(root / "test" / "captions.parquet", caption_ids, captions, captions_per_image=CPI)

    metadata = {
        "weights_sha256": "ab" * 32,
        "untrained": untrained,
        "extractor": "bua-r101",
        "object_names": ["background", "red square,red box", "blue square", "tree", "sky"],
    }
    with FeatureStoreWriter(
        root / "features", rows_per_part=4, row_group_size=2, metadata=metadata
    ) as writer:
        for i, image_id in enumerate(image_ids):
            n = 4
            boxes = np.array(
                [[5, 5, 60, 50], [30, 20, 90, 60], [0, 0, 119, 80], [70, 10, 110, 40]], np.float32
            )
            writer.add(
                RegionRecord(
                    image_id=image_id,
                    image_w=120,
                    image_h=90 + 10 * i,
                    boxes=boxes,
                    features=rng.normal(size=(n, 8)).astype(np.float32),
                    object_ids=np.array([1, 2, 3, 4], np.int32),
                    object_conf=np.array([0.9, 0.8, 0.5, 0.3], np.float32),
                )
            )

    scores = rng.normal(size=(N_IMAGES, N_IMAGES * CPI))
    scores[np.arange(N_IMAGES * CPI) // CPI, np.arange(N_IMAGES * CPI)] += 1.5
    evaluation = root / "eval"
    write_metrics_json(evaluation / "metrics.json", evaluate_protocol(scores, "flickr30k_1k", CPI))
    ranks = retrieval_ranks(scores, CPI, top_k=5)
    table = ranks_table(ranks, captions_per_image=CPI, image_ids=image_ids, captions=captions)
    write_ranks_parquet(evaluation / "ranks.parquet", table)

    train = root / "train"
    for epoch in range(1, 5):
        append_epoch(train / "metrics.jsonl", _epoch_record(epoch, val_rsum=100.0 + 20 * epoch))
    return {"images": images, "features": root / "features", "eval": evaluation, "train": train, "root": root}


def _epoch_record(epoch: int, val_rsum: float) -> EpochRecord:
    recalls = {f"val_{d}_r{k}": val_rsum / 6 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    ranks = {f"val_{d}_{r}": 2.0 for d in ("i2t", "t2i") for r in ("medr", "meanr")}
    return EpochRecord(
        epoch=epoch,
        lr=2e-4,
        train_loss=50.0 / epoch,
        steps=10,
        epoch_time_s=1.5,
        pairs_per_s=200.0,
        **recalls,
        **ranks,
        val_rsum=val_rsum,
        val_time_s=0.1,
        val_images=N_IMAGES,
    )


def _sources(paths: dict[str, Path]) -> ReportSources:
    return ReportSources(
        eval_dir=paths["eval"],
        features=paths["features"],
        captions=paths["root"] / "test" / "captions.parquet",
        images=paths["images"],
        train_dir=paths["train"],
        splits=paths["root"],
    )


def _inputs(
    paths: dict[str, Path], dataset: str, protocol: str = "flickr30k_1k", num_examples: int = 2
) -> ReportInputs:
    settings = ReportParams(num_examples=num_examples, top_k=3)
    return load_inputs(_sources(paths), settings, dataset=dataset, protocol=protocol)


def _assert_png(path: Path, min_bytes: int = 3000) -> None:
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
        assert image.width > 200 and image.height > 150
        assert pixels.std() > 5, f"{path} looks blank"


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make_run(tmp_path_factory.mktemp("untrained_run"), untrained=True)


def test_report_files_tables_and_untrained_notice(untrained_run: dict[str, Path], tmp_path: Path) -> None:
    inputs = _inputs(untrained_run, "sample")
    outputs = build_report(inputs, tmp_path / "report")
    markdown = outputs.markdown.read_text()
    page = outputs.html.read_text()
    for name in ("training_curves.png", "recall_at_k.png", "example_1.png", "example_2.png"):
        _assert_png(tmp_path / "report" / name)
    metrics = json.loads((untrained_run["eval"] / "metrics.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "t2i_r10", "rsum"):
        assert f"{metrics[key]:.1f}" in markdown
    chance = chance_metrics(N_IMAGES, CPI)
    chance_line = next(line for line in markdown.splitlines() if line.startswith("| chance"))
    assert f"{chance['t2i_r1']:.1f}" in chance_line and f"{chance['rsum']:.1f}" in chance_line
    assert "untrained detector" in markdown and "untrained detector" in page
    assert "plumbing" in markdown
    # The sample is not compared with the paper: no published rows.
    assert "SCAN t-i AVG" not in markdown
    # HTML is self-contained: every figure embedded, no relative image links.
    assert page.count("data:image/png;base64,") == len(outputs.figures)
    assert 'src="example_1.png"' not in page
    assert "](example_1.png)" in markdown
    # dvc plots data
    rows = (tmp_path / "report" / "recall_at_k.csv").read_text().splitlines()
    assert rows[0] == "k,i2t,t2i,i2t_chance,t2i_chance"
    assert float(rows[-1].split(",")[2]) == pytest.approx(100.0)  # t2i R@N = 100 on N images
    curves = (tmp_path / "report" / "training_curves.csv").read_text().splitlines()
    assert curves[0] == "epoch,train_loss,val_rsum,lr"
    assert len(curves) == 5 and curves[1].split(",")[2] == "120.0"  # val rsum of the typed training log
    # Box labels come from the store's objects vocabulary (first synonym of a line).
    assert inputs.object_names is not None and inputs.object_names[1] == "red square"


@pytest.mark.parametrize(("dataset", "protocol"), [("flickr30k", "flickr30k_1k"), ("coco", "coco_5k")])
def test_paper_numbers_only_for_real_datasets(
    untrained_run: dict[str, Path], tmp_path: Path, dataset: str, protocol: str
) -> None:
    inputs = _inputs(untrained_run, dataset, protocol, num_examples=0)
    inputs = dataclasses.replace(inputs, metrics={**inputs.metrics, "protocol": protocol})  # as evaluated
    outputs = build_report(inputs, tmp_path / "report")
    markdown = outputs.markdown.read_text()
    published = [r for r in load_published_results()["results"] if r["protocol"] == protocol]
    assert published
    for row in published:
        assert row["label"] in markdown
        line = next(line for line in markdown.splitlines() if row["label"] in line)
        assert f"{row['i2t_r1']:.1f}" in line and f"{row['t2i_r10']:.1f}" in line
    # Only the evaluated protocol's rows: COCO 5K lists no t-i AVG model, Flickr30K no COCO table.
    assert ("SCAN t-i AVG" not in markdown) if protocol == "coco_5k" else ("COCO" not in markdown)


def test_protocol_all_on_coco_shows_both_protocols_and_folds(
    untrained_run: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(10, 50))
    metrics = {**evaluate_protocol(scores, "coco_5k", CPI), "protocol": "all"}
    metrics["coco_1k"] = evaluate_protocol(scores, "coco_1k", CPI)
    metrics["models"] = ["scan_t2i_lse", "scan_i2t_avg"]
    inputs = dataclasses.replace(_inputs(untrained_run, "coco", "all", num_examples=0), metrics=metrics)
    markdown = build_report(inputs, tmp_path / "report").markdown.read_text()
    assert "COCO 1K (5-fold average): this run beside the papers" in markdown
    assert "COCO 5K: this run beside the papers" in markdown
    assert "| chance, 2 images x 10 captions per fold" in markdown  # coco_1k chance uses the fold gallery
    assert "| chance, 10 images x 50 captions" in markdown
    assert sum(line.startswith("| fold ") for line in markdown.splitlines()) == 5
    assert "SCAN ensemble t-i LSE + i-t AVG (same variant)" in markdown  # the two models form that ensemble


def test_trained_store_shows_weights_hash(tmp_path: Path) -> None:
    paths = _make_run(tmp_path / "run", untrained=False)
    outputs = build_report(_inputs(paths, "flickr30k", num_examples=0), tmp_path / "report")
    markdown = outputs.markdown.read_text()
    assert "untrained detector" not in markdown.lower()
    assert "ab" * 32 in markdown


def test_published_results_have_every_protocol_and_rsum() -> None:
    published = load_published_results()
    assert "source" in published
    for dataset, protocols in (("flickr30k", {"flickr30k_1k"}), ("coco", {"coco_1k", "coco_5k"})):
        rows = published_rows(dataset, None, published)
        assert {r["protocol"] for r in rows} == protocols
        for row in rows:
            recalls = [row[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
            assert all(0 < v <= 100 for v in recalls)
            assert row["rsum"] == pytest.approx(sum(recalls), abs=0.15)  # stated rsums agree with the recalls
    assert published_rows("sample", "flickr30k_1k", published) == []


def test_chance_metrics_closed_forms() -> None:
    n = 40
    chance = chance_metrics(n, CPI)
    for k in (1, 5, 10):
        assert chance[f"t2i_r{k}"] == pytest.approx(100.0 * k / n)
        expected = 1 - comb(CPI * n - CPI, k) / comb(CPI * n, k)
        assert chance[f"i2t_r{k}"] == pytest.approx(100.0 * expected)
    assert chance["t2i_meanr"] == pytest.approx((n - 1) / 2 + 1)  # uniform rank 0..n-1
    assert chance["i2t_meanr"] == pytest.approx((CPI * n - CPI) / (CPI + 1) + 1)  # E[min of 5 of 5n] + 1
    # Monte-Carlo check of the median of the i2t rank distribution
    rng = np.random.default_rng(0)
    ranks = np.array([rng.permutation(CPI * n)[:CPI].min() for _ in range(20000)])
    assert chance["i2t_medr"] == pytest.approx(np.floor(np.median(ranks)) + 1, abs=1)


def test_recall_curve_counts_ranks_below_k() -> None:
    curve = recall_curve(np.array([0, 0, 1, 4, 9]), 10)
    assert curve[0] == pytest.approx(40.0) and curve[1] == pytest.approx(60.0)
    assert curve[4] == pytest.approx(80.0) and curve[9] == pytest.approx(100.0)


def test_bad_training_log_names_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(_epoch_record(1, 120.0).to_json_line() + "not json\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_training_log(log)
    bad_metrics = tmp_path / "metrics.json"
    bad_metrics.write_text('{"i2t_r1": 1}')
    with pytest.raises(ReportError, match=r"metrics\.json: missing metric"):
        read_metrics(bad_metrics)


def test_report_cli(untrained_run: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path / "cli_report"
    result = CliRunner().invoke(
        app,
        [
            "report",
            "--eval", str(untrained_run["eval"]),
            "--train", str(untrained_run["train"]),
            "--features", str(untrained_run["features"]),
            "--captions", str(untrained_run["root"] / "test" / "captions.parquet"),
            "--images", str(untrained_run["images"]),
            "--splits", str(untrained_run["root"]),
            "--dataset", "flickr30k",
            "--out", str(out),
            "--num-examples", "1",
            "--set", "top_k=2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "SCAN i-t LSE" in markdown and "untrained detector" in markdown
    assert (out / "example_1.png").is_file() and not (out / "example_2.png").exists()
    assert "their top 2 images" in markdown  # --set reached the report section

    bad_setting = CliRunner().invoke(
        app, ["report", *_required_options(untrained_run, out), "--set", "top_k=0"]
    )
    assert bad_setting.exit_code == 2 and "--set report.top_k" in bad_setting.output

    missing = CliRunner().invoke(
        app,
        ["report", "--eval", str(tmp_path / "nope"), "--features", str(untrained_run["features"]),
         "--captions", "x.parquet", "--images", str(untrained_run["images"]), "--out", str(out)],
    )  # fmt: skip
    assert missing.exit_code != 0 and "nope" in missing.output


def _required_options(paths: dict[str, Path], out: Path) -> list[str]:
    """The required options of `scan-pipe report` for the fake run."""
    return [
        "--eval", str(paths["eval"]),
        "--features", str(paths["features"]),
        "--captions", str(paths["root"] / "test" / "captions.parquet"),
        "--images", str(paths["images"]),
        "--out", str(out),
    ]  # fmt: skip


def test_custom_templates_restyle_the_report(untrained_run: dict[str, Path], tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "report.md.j2").write_text(
        "RESTYLED {{ page.title }}\n{% for section in page.sections %}* {{ section.title }}\n{% endfor %}"
    )
    inputs = _inputs(untrained_run, "sample", num_examples=0)
    outputs = build_report(inputs, tmp_path / "report", template_dir=templates)
    markdown = outputs.markdown.read_text()
    assert markdown.startswith("RESTYLED scan-pipe report: sample\n* Run configuration\n")
    assert "| chance" not in markdown
    # The template folder lacks report.html.j2: the bundled one is used.
    assert "<h2>Recall</h2>" in outputs.html.read_text()

    (templates / "report.md.j2").write_text("{% for section in page.sections %}")
    with pytest.raises(ReportError, match=r"report\.md\.j2"):
        build_report(inputs, tmp_path / "report", template_dir=templates)


def test_objects_vocab_file_replaces_the_store_names(untrained_run: dict[str, Path], tmp_path: Path) -> None:
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("background\ngreen circle,disc\n")
    sources = dataclasses.replace(_sources(untrained_run), objects_vocab=vocab)
    inputs = load_inputs(sources, ReportParams(num_examples=1, top_k=3), dataset="sample")
    assert inputs.object_names == ["background", "green circle"]
    with pytest.raises(UserError, match=r"nowhere\.txt: vocabulary file not found"):
        load_inputs(
            dataclasses.replace(sources, objects_vocab=tmp_path / "nowhere.txt"),
            ReportParams(num_examples=1, top_k=3),
            dataset="sample",
        )


def test_examples_tint_the_top_match_with_the_models_attention(tmp_path: Path) -> None:
    """With the evaluated checkpoint at hand, each query's top image carries its attention heat map."""
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.build import create_model
    from pipeline.report.examples import choose_examples
    from pipeline.vocab import build_vocabulary

    paths = _make_run(tmp_path / "run", untrained=False)
    captions_path = paths["root"] / "test" / "captions.parquet"
    vocab = build_vocabulary(read_captions(captions_path).captions, min_count=1)
    vocab_path = vocab.save(tmp_path / "vocab.json")
    torch.manual_seed(0)
    model = create_model("scan_t2i_avg", vocab_size=len(vocab), img_dim=8, embed_size=16, word_dim=8)
    save_checkpoint(
        paths["train"] / "checkpoints" / "best",
        model,
        model_name="scan_t2i_avg",
        model_config=model.config,
        epoch=1,
        vocab_path=vocab_path,
    )
    inputs = _inputs(paths, "sample", num_examples=1)
    assert inputs.checkpoint_dir == paths["train"] / "checkpoints" / "best"
    tinted = build_report(inputs, tmp_path / "tinted")
    plain = build_report(dataclasses.replace(inputs, checkpoint_dir=None), tmp_path / "plain")
    assert "tinted by the model's attention of the caption's words" in tinted.markdown.read_text()
    assert "tinted by" not in plain.markdown.read_text()

    with (
        Image.open(tmp_path / "tinted" / "example_1.png") as a,
        Image.open(tmp_path / "plain" / "example_1.png") as b,
    ):
        assert a.size == b.size
        changed = np.any(np.asarray(a.convert("RGB")) != np.asarray(b.convert("RGB")), axis=2)
    assert changed.sum() > 1000  # the heat map is drawn ...
    captions = inputs.test_captions
    example = choose_examples(
        inputs.ranks["t2i"],
        captions.captions,
        captions.unique_image_ids,
        count=1,
        top_k=3,
        captions_per_image=captions.captions_per_image,
    )[0]
    top_height = 90 + 10 * int(example.retrieved_image_ids[0][len("scene_") : -len(".jpg")])
    first_tile_right = 12 + round(120 * 220 / top_height) + 2 * 6  # margin + picture + border
    assert np.flatnonzero(changed.any(axis=0)).max() < first_tile_right  # ... on the top image only
