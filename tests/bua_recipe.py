"""Regenerate the BUA fixture weights from `weights_manifest.json` (fixtures README section 3.2).

One numpy Generator for the whole model, consumed in manifest order; the global digest is checked against the
manifest's `weights_sha256` (never pasted into code). The result is cached per process (2 s, 262 MB) and can
be written once per session as a .safetensors file for runner tests.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from extractors.bua.weights import tensors_sha256, write_safetensors


def _generate(manifest: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    anchors = np.asarray(manifest["caffe_anchors"], dtype=np.float32)
    state: dict[str, np.ndarray] = {}
    for entry in manifest["entries"]:
        shape = tuple(entry["shape"])
        init = entry["init"]
        if init["kind"] == "normal":
            values = init["offset"] + init["scale"] * rng.standard_normal(size=shape)
            for row, add in init.get("add_to_rows", {}).items():
                values[int(row)] += add
            tensor = values.astype(np.float32)
        elif init.get("value") == "caffe_anchors":
            tensor = anchors.reshape(shape).copy()
        else:
            tensor = np.zeros(shape, dtype=np.int64)
        if str(tensor.dtype) != entry["dtype"]:
            raise AssertionError(f"{entry['key']}: generated {tensor.dtype}, manifest says {entry['dtype']}")
        state[entry["key"]] = tensor
    return state


@functools.lru_cache(maxsize=2)
def recipe_weights(manifest_path: str) -> dict[str, np.ndarray]:
    """The fixture weights (HF layout, manifest order), verified against the manifest's global sha256."""
    manifest = json.loads(Path(manifest_path).read_text())
    state = _generate(manifest, int(manifest["seed"]))
    digest = tensors_sha256(state)
    if digest != manifest["weights_sha256"]:
        raise AssertionError(
            f"recipe weights digest {digest} != manifest weights_sha256 {manifest['weights_sha256']}"
        )
    return state


def write_recipe_safetensors(manifest_path: str | Path, out_path: str | Path) -> Path:
    """Write the recipe weights as a .safetensors checkpoint (canonical names) and return its path."""
    out_path = Path(out_path)
    write_safetensors(recipe_weights(str(manifest_path)), out_path)
    return out_path
