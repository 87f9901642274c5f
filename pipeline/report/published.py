"""The papers' numbers, bundled as `pipeline/resources/published_results.json`, for the comparison table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from pipeline.report.chance import DIRECTIONS, RECALL_KS

PAPER_DATASETS = {"flickr30k": ("flickr30k_1k",), "coco": ("coco_1k", "coco_5k")}
PROTOCOL_TITLES = {
    "flickr30k_1k": "Flickr30K 1K test",
    "coco_1k": "COCO 1K (5-fold average)",
    "coco_5k": "COCO 5K",
}


def load_published_results() -> dict[str, Any]:
    """The bundled paper numbers: `source` and a list of `results` rows (label, protocol, variant, R@K)."""
    text = resources.files("pipeline").joinpath("resources/published_results.json").read_text()
    return json.loads(text)


def published_rows(dataset: str, protocol: str | None, published: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Published results for this dataset (and protocol when it names one); rsum summed where not stated."""
    protocols = PAPER_DATASETS.get(dataset, ())
    if protocol in protocols:
        protocols = (protocol,)
    rows = []
    for entry in published["results"]:
        if entry["protocol"] in protocols:
            row = dict(entry)
            if "rsum" not in row:
                row["rsum"] = round(sum(row[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS), 1)
            rows.append(row)
    return rows
