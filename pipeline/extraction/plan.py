"""Which images a run extracts: the folder or list file, minus what the output store already holds, split
deterministically over the ranks; and the refusal to extend a store made by another extractor."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.extraction.summary import ERRORS_FILE, SUMMARY_FILE
from pipeline.image_files import ImageListError, ImageListing, check_listed, read_image_list, scan_images
from pipeline.store import FeatureStore, FeatureStoreError, list_parts

# Metadata keys that must agree between the parts already in OUT and this run: mixing them would make one
# feature set out of two different extractors.
COMPATIBILITY_KEYS = ("extractor", "detector_config", "weights_sha256", "untrained", "precision", "exif")
RANK_FILE = re.compile(r"^\.extract-rank-(\d+)\.json$")
# Temporary files of atomic_output / publish_new (`.NAME.<random>.tmp`) for everything a run writes into OUT.
_STALE_TEMPORARY = re.compile(
    rf"^\.(part-.+\.parquet|{re.escape(SUMMARY_FILE)}|{re.escape(ERRORS_FILE)}|\.extract-rank-\d+\.json)"
    r"\..+\.tmp$"
)


class ExtractError(UserError):
    """A problem with the inputs or settings of a run; the message names the file or option."""


def plan_image_ids(
    images_root: Path, list_file: Path | None, *, follow_symlinks: bool = False
) -> ImageListing:
    """The image ids of the run (a list file's entries in order, or every jpg/jpeg/png under the root,
    sorted), and the files refused before decoding, each to become an error record: names that are not
    valid UTF-8 or hold control characters, symlinks leading outside the root (unless `follow_symlinks`),
    list entries that match a file only after Unicode normalisation. Ids are kept byte-for-byte as the file
    system (or the list file) spells them: no Unicode normalisation, no `\\` to `/` rewriting on POSIX.
    """
    try:
        if list_file is not None:
            if not images_root.is_dir():
                raise ImageListError(f"{images_root}: images folder not found (or not a directory)")
            return check_listed(images_root, read_image_list(list_file), follow_symlinks=follow_symlinks)
        listing = scan_images(images_root, follow_symlinks=follow_symlinks)
    except ImageListError as exc:
        raise ExtractError(str(exc)) from None
    if not listing.image_ids and not listing.refused:
        raise ExtractError(f"{images_root}: no .jpg/.jpeg/.png images found (searched recursively)")
    return listing


def shard_for_rank(pending: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s deterministic share of the sorted pending ids (round-robin keeps the shares balanced)."""
    return list(sorted(pending)[rank::world_size])


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete temporary files a killed run left behind (never complete parts: those are kept).

    Call it only while holding the store's lock (`store_lock`): then no other run is live, so every
    temporary belongs to a dead one; without the lock this would delete a live run's part in the making.
    """
    removed = []
    if out.is_dir():
        for entry in os.scandir(out):
            if entry.is_file() and (_STALE_TEMPORARY.match(entry.name) or RANK_FILE.match(entry.name)):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _differences(existing: Mapping[str, Any], metadata: Mapping[str, Any], feature_dtype: str) -> str:
    """The metadata keys that differ between the store and this run, described; empty when they agree."""
    differing = [key for key in COMPATIBILITY_KEYS if existing.get(key) != metadata.get(key)]
    if existing.get("feature_dtype") != feature_dtype:
        differing.append("feature_dtype")
    details = [
        f"{key}: stored {existing.get(key)!r}, this run "
        f"{feature_dtype if key == 'feature_dtype' else metadata.get(key)!r}"
        for key in differing
        if key != "detector_config"
    ]
    if "detector_config" in differing:
        old, new = existing.get("detector_config") or {}, metadata.get("detector_config") or {}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        details.append(f"detector_config differs in {changed}")
    return "; ".join(details)


def stored_ids_to_skip(out: Path, metadata: Mapping[str, Any], feature_dtype: str) -> set[str]:
    """Image ids already in the store at `out` (opened once), after checking it was made like this run.

    Refuses to add features to a store made with another detector, weights, precision or feature dtype.
    """
    if not out.is_dir() or not list_parts(out):
        return set()
    try:
        store = FeatureStore(out)
    except FeatureStoreError as exc:
        raise ExtractError(f"{out}: the existing feature store cannot be resumed: {exc}") from None
    details = _differences(store.metadata, metadata, feature_dtype)
    if details:
        raise ExtractError(
            f"{out} already holds features made differently ({details}); resume with the same settings "
            "or choose another output folder (--out)"
        )
    return store.existing_ids()
