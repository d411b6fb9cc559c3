"""Where a config comes from: a bundled profile, a local file or directory, or the Hub.

This module (with cli.py) is where vramplan does I/O. It returns the raw config as data and,
when safetensors headers are at hand, the stored tensors' names, dtypes and shapes. It never
imports or executes code from a model repository: `auto_map` is ignored.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SourceError

SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors file


# bytes per element of safetensors dtypes (F4-packed types store two values per byte)
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                           "F8_E8M0": 1}


@dataclass(frozen=True)
class StoredTensor:
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * SAFETENSORS_DTYPE_BYTES.get(self.dtype.upper(), 2)


def stored_sizes(stored: dict[str, StoredTensor] | None) -> dict[str, tuple[int, tuple[int, ...]]] | None:
    """name -> (bytes, shape), the form the engine takes (it never sees I/O types)."""
    if not stored:
        return None
    return {name: (t.nbytes, t.shape) for name, t in stored.items()}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference: its config as parsed JSON, and how it was found."""

    name: str
    origin: str  # "bundled", "file", "directory" or "hub"
    config: dict[str, Any]
    stored_tensors: dict[str, StoredTensor] | None = field(default=None, compare=False)


def _models_dir():
    return resources.files("vramplan.profiles") / "models"


@lru_cache(maxsize=1)
def bundled_index() -> dict[str, str]:
    """Lower-cased Hub id and short alias -> file name of every bundled config."""
    index: dict[str, str] = {}
    for entry in sorted(_models_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        hub_id = bundled_hub_id(entry.name)
        index[hub_id.lower()] = entry.name
        index.setdefault(hub_id.split("/", 1)[1].lower(), entry.name)
    return index


def bundled_hub_id(file_name: str) -> str:
    return file_name.removesuffix(".json").replace("--", "/", 1)


def bundled_names() -> list[tuple[str, str]]:
    """(Hub id, alias) of every bundled config, sorted by Hub id."""
    names = sorted({bundled_hub_id(f) for f in bundled_index().values()})
    return [(hub_id, hub_id.split("/", 1)[1].lower()) for hub_id in names]


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(data, dict):
        raise SourceError(f"{where} must hold a JSON object, not {type(data).__name__}.")
    return data


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Names, dtypes and shapes from a .safetensors file's header; the tensor data is not read."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SourceError(f"{path} is too short to be a safetensors file.")
        (length,) = struct.unpack("<Q", raw)
        if length > SAFETENSORS_HEADER_LIMIT:
            raise SourceError(f"{path} has an implausible safetensors header size ({length} bytes).")
        header = _parse_json(fh.read(length).decode("utf-8", "replace"), str(path))
    return _stored_from_header(header)


def _stored_from_header(header: dict[str, Any]) -> dict[str, StoredTensor]:
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        tensors[name] = StoredTensor(str(info.get("dtype")), tuple(int(d) for d in info.get("shape", [])))
    return tensors


def _from_directory(directory: Path) -> ModelSource:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{directory} has no config.json; pass a model directory, a config.json, "
                          "a Hub id or a bundled name (see `vramplan models`).")
    config = _parse_json(config_path.read_text(encoding="utf-8"), str(config_path))
    stored: dict[str, StoredTensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        stored.update(read_safetensors_header(file))
    return ModelSource(str(directory), "directory", config, stored or None)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so that an offline machine fails in seconds
    instead of through huggingface_hub's retry back-off."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co",
                                       endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - a core dependency
        raise SourceError("huggingface_hub is not installed; install vramplan again.") from None
    local_only = _offline() or not _hub_reachable()
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=local_only)
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN.") from None
    except RepositoryNotFoundError:
        raise SourceError(f"No Hub repository {repo_id!r} (or it is private: set HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id} has no revision {revision!r}.") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as exc:
        if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
            raise SourceError(f"{repo_id} has no config.json.") from None
        raise SourceError(
            f"{repo_id!r} is neither a local path nor a bundled model, and the Hub cannot be "
            "reached (offline, or not in the local cache); see `vramplan models` for bundled names."
        ) from None
    config = _parse_json(Path(path).read_text(encoding="utf-8"), f"{repo_id}/config.json")
    stored = None if local_only else _hub_safetensors(repo_id, revision)
    return ModelSource(repo_id, "hub", config, stored)


def _hub_safetensors(repo_id: str, revision: str | None) -> dict[str, StoredTensor] | None:
    """Stored tensors from the Hub's safetensors headers when reachable; None otherwise."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception:  # metadata is a refinement; the config alone still gives an estimate
        return None
    stored: dict[str, StoredTensor] = {}
    for file_meta in meta.files_metadata.values():
        for name, info in file_meta.tensors.items():
            stored[name] = StoredTensor(str(info.dtype), tuple(int(d) for d in info.shape))
    return stored or None


def load_bundled(name: str) -> ModelSource | None:
    file_name = bundled_index().get(name.strip().lower())
    if file_name is None:
        return None
    text = (_models_dir() / file_name).read_text(encoding="utf-8")
    return ModelSource(bundled_hub_id(file_name), "bundled", _parse_json(text, file_name))


def resolve(reference: str, revision: str | None = None) -> ModelSource:
    """Turn MODEL (path, bundled name or Hub id) into its config.

    Local paths win, then the bundle (offline, by Hub id or alias), then the Hub.
    """
    if not reference or not reference.strip():
        raise SourceError("Give a model: a Hub id, a local directory, a config.json or a bundled name.")
    path = Path(reference).expanduser()
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return ModelSource(str(path), "file", _parse_json(path.read_text(encoding="utf-8"), str(path)))
    if revision is None:
        bundled = load_bundled(reference)
        if bundled is not None:
            return bundled
    looks_like_path = reference.startswith((".", "/", "~")) or reference.endswith(".json") \
        or os.sep in reference.strip("/").split("/", 1)[-1]
    if looks_like_path or reference.count("/") != 1:
        raise SourceError(f"{reference!r} is not an existing path, a bundled model or a Hub id "
                          "(owner/name); `vramplan models` lists the bundled ones.")
    return _from_hub(reference, revision)
