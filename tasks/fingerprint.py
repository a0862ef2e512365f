"""Fingerprints: sha256 digests of canonical JSON that identify artifacts in the store."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "TRAINING_CODE",
    "canonical_json",
    "digest_file",
    "digest_json",
    "fingerprint_inputs",
    "fingerprint_of",
    "library_versions",
]

# Modules whose code shapes what a stage trains or writes. Editing one of them changes
# every fingerprint, so artifacts built by older code are never reused.
TRAINING_CODE = (
    "blocks.py", "training.py", "features.py", "assembly.py", "dataset.py", "evaluation.py",
    "pretrained.py", "stage_input.py",
)
LIBRARIES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pyarrow", "scikit-learn")
CHUNK_BYTES = 1 << 20


def canonical_json(value: Any) -> str:
    """Serialize `value` with sorted keys and no whitespace, so equal inputs give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest_json(value: Any) -> str:
    """Return the sha256 hex digest of `value`'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


def digest_file(path: Path) -> str:
    """Return the sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Return the installed versions of the libraries that shape training."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Return the sha256 of the stackwise modules listed in TRAINING_CODE."""
    folder = Path(__file__).parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def fingerprint_inputs(
    stage: dict[str, Any], parent_digests: dict[str, str], dataset_digest: str
) -> dict[str, Any]:
    """Collect everything a stage's fingerprint covers, as a JSON-ready mapping.

    `stage` is the normalized stage spec (it carries the seed), `parent_digests` maps
    each parent to its artifact digest, so a parent retrained to different weights
    changes its children's fingerprints.
    """
    return {
        "stage": stage,
        "parents": dict(sorted(parent_digests.items())),
        "dataset": dataset_digest,
        "code": code_digest(),
        "libraries": library_versions(),
    }


def fingerprint_of(inputs: dict[str, Any]) -> str:
    """Return the fingerprint for the mapping built by `fingerprint_inputs`."""
    return digest_json(inputs)
