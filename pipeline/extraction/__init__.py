"""The extraction engine behind `scan-pipe extract`: images -> detector regions -> feature store.

The detector comes in as an object (`RegionDetector`: decoded BGR images in, regions out); building it is the
caller's job, so this package never imports extractors/. Design points, each answering a way a long
extraction goes wrong:

* Resumable: image ids already in the output store are skipped; parts are written atomically by the store, so
  a killed run leaves whole parts only and a rerun computes exactly the missing images.
* Bad input never stops the run: decoding happens in DataLoader workers (pipeline/images.py), a failure
  becomes an error item, and a detector failure on a batch is retried image by image to isolate the
  culprit. Failures go to `OUT/_errors.jsonl`; they are not in the store, so a rerun retries them.
* Sharded: under `torchrun` every rank takes a deterministic slice of the sorted, not-yet-done image ids and
  writes its own parts (shard = rank) into the same directory; the ranks' results are merged after a barrier.
* One dtype convention: a detector result becomes a store row once, in the store's dtypes (`to_record`).
"""

from __future__ import annotations

from pipeline.extraction.detector import DetectedRegions, RegionDetector, to_record
from pipeline.extraction.plan import COMPATIBILITY_KEYS, ExtractError
from pipeline.extraction.run import extract_images
from pipeline.extraction.summary import ERRORS_FILE, SUMMARY_FILE, ExtractSummary

__all__ = [
    "COMPATIBILITY_KEYS",
    "ERRORS_FILE",
    "SUMMARY_FILE",
    "DetectedRegions",
    "ExtractError",
    "ExtractSummary",
    "RegionDetector",
    "extract_images",
    "to_record",
]
