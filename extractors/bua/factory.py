"""Build a ready detector from a few plain settings: the configuration, then published or seeded weights.

What a feature store must record about how its features were made (configuration, weights digest, the
untrained flag) is returned beside the detector, so every caller records the same facts.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector
from extractors.bua.weights import WEIGHTS_NOT_GIVEN_MESSAGE, WeightsError, load_weights

RANDOM_WEIGHTS = "random"


class DetectorSetupError(ValueError):
    """The detector cannot be built as asked (weights or settings); the message names the file or value."""


@dataclass
class BuiltDetector:
    """A detector in eval mode on the CPU and what a store records about it."""

    detector: BottomUpAttentionDetector
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what loading the weights converted or noticed

    @property
    def untrained(self) -> bool:
        return bool(self.metadata["untrained"])


def detector_config(
    arch: Literal["full", "tiny"] = "full",
    boxes: Literal["36", "adaptive"] = "36",
    **overrides: int | None,
) -> DetectorConfig:
    """The architecture's configuration, its box mode, then the given (not None) test-time overrides."""
    base = DetectorConfig.tiny() if arch == "tiny" else DetectorConfig()
    config = base.with_box_mode("adaptive" if boxes == "adaptive" else "fixed")
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return DetectorConfig.model_validate({**config.model_dump(), **given}) if given else config
    except ValueError as exc:
        raise DetectorSetupError(f"invalid detector settings {given}: {exc}") from None


def _state_digest(detector: torch.nn.Module) -> str:
    """sha256 of the tensors in state-dict order: names the weights a seed initialises."""
    digest = hashlib.sha256()
    for name, tensor in detector.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_detector(
    weights: str | Path | None,
    *,
    arch: Literal["full", "tiny"] = "full",
    boxes: Literal["36", "adaptive"] = "36",
    seed: int = 0,
    **overrides: int | None,
) -> BuiltDetector:
    """A detector with `weights` loaded (a checkpoint path, or "random": seeded initialisation, untrained).

    `overrides`: `test_scale`, `max_size`, `pre_nms_top_n`, `post_nms_top_n` (None keeps the arch's value).
    """
    if weights is None:
        raise DetectorSetupError(WEIGHTS_NOT_GIVEN_MESSAGE)
    config = detector_config(arch, boxes, **overrides)
    untrained = str(weights) == RANDOM_WEIGHTS
    metadata: dict[str, Any] = {
        "extractor": "bottom-up-attention",
        "arch": arch,
        "detector_config": config.model_dump(mode="json"),
        "weights": str(weights),
        "untrained": untrained,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        detector = BottomUpAttentionDetector(config)
    notes: list[str] = []
    if untrained:
        metadata.update(weights_sha256=_state_digest(detector), weights_seed=seed)
    else:
        path = Path(weights)
        if not path.is_file():
            raise DetectorSetupError(
                f"{path}: weights file not found (a checkpoint file, or 'random' for an untrained detector)"
            )
        try:
            with warnings.catch_warnings():  # an anchor mismatch is in the report's notes
                warnings.simplefilter("ignore")
                report = load_weights(detector, path)
        except WeightsError as exc:  # one line that already names the file and the reason
            raise DetectorSetupError(str(exc)) from None
        except MemoryError:
            raise DetectorSetupError(f"{path}: not enough memory to load the detector weights") from None
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            message = " ".join(str(exc).split())  # torch's messages span lines; the user gets one
            raise DetectorSetupError(f"{path}: cannot load detector weights: {message}") from None
        notes.append(report.summary())
        metadata["weights_sha256"] = str(report.sha256)
    return BuiltDetector(detector.eval(), metadata, notes)
