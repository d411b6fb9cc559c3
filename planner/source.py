"""Where a config comes from: a bundled profile, a local file or directory, or the Hub.

This module (with cli.py) is where vramplan does I/O. It returns the raw config as data and,
when safetensors headers are at hand, the stored tensors' names, dtypes and shapes. It never
imports or executes code from a model repository: `auto_map` is ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from .base import Frozen
from .errors import SourceError

SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors file
# Bounds on what vramplan reads from files it is given: no real config.json is near 16 MiB
# (DeepSeek-V3's is 1.7 KiB), no real JSON nests deeper than a handful of levels.
CONFIG_LIMIT = 16 * 2**20
JSON_DEPTH_LIMIT = 64
MAX_TENSOR_ELEMENTS = 1 << 48  # 256 T elements: beyond any checkpoint
# Hub repository ids: huggingface_hub's rule (owner/name, word characters, '-', '.', at most 96)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


# bits per element of safetensors dtypes (F4 and F6 pack values below a byte)
SAFETENSORS_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
                          "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
                          "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64}
SAFETENSORS_DTYPE_BYTES = {name: max(bits // 8, 1) for name, bits in SAFETENSORS_DTYPE_BITS.items()}
# the float dtypes from_pretrained(dtype="auto") can load a checkpoint in, by safetensors name
FLOAT_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


@dataclass(frozen=True)
class StoredTensor:
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return -(-self.elements * SAFETENSORS_DTYPE_BITS.get(self.dtype.upper(), 16) // 8)


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


class ModelEntry(Frozen):
    """One bundled config as `vramplan models` lists it."""

    hub_id: str
    alias: str
    model_type: str | None = None
    parameters: int | None = None
    refused: str | None = None  # why vramplan does not size it


def load_dtype(config_dtype: str | None, quantized: bool,
               stored: dict[str, StoredTensor] | None) -> tuple[str | None, str | None]:
    """The dtype from_pretrained loads a model in when the config names none, and a note saying
    what was assumed: transformers 5.17 defaults to dtype="auto", which falls back to the
    checkpoint's stored float dtype (gpt2 loads in fp32). A pre-quantized checkpoint's scheme
    decides its own compute dtype, so it is left alone."""
    if config_dtype is not None or quantized:
        return config_dtype, None
    found = stored_float_dtype(stored)
    if found is not None:
        return found, (f"the config names no torch_dtype: {found}, the dtype the checkpoint's safetensors "
                       "store, which from_pretrained loads by default (dtype='auto').")
    return "fp32", ("the config names no torch_dtype and no safetensors header was read: fp32 assumed, torch's "
                    "default dtype (from_pretrained loads the checkpoint's stored dtype; pass --precision "
                    "if it stores 16-bit weights).")


def stored_float_dtype(stored: dict[str, StoredTensor] | None) -> str | None:
    """The float dtype holding most of a checkpoint's bytes (fp32, fp16 or bf16), or None.

    transformers 5.17's from_pretrained defaults to dtype="auto": the config's dtype, else the
    dtype of the checkpoint's floating-point tensors (modeling_utils._get_dtype)."""
    if not stored:
        return None
    totals: dict[str, int] = {}
    for tensor in stored.values():
        name = FLOAT_DTYPES.get(tensor.dtype.upper())
        if name:
            totals[name] = totals.get(name, 0) + tensor.nbytes
    return max(totals, key=lambda k: totals[k]) if totals else None


def _stat_regular(path: Path, label: str, expected: str, shown: str | None = None) -> os.stat_result:
    """`path`'s stat when it is a regular file; a dangling link, a directory, a FIFO or a device
    is a SourceError naming it as `label` (`shown` where the path may be unprintable)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{label} does not exist (or is a dangling link).") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"Cannot read {shown or label}: {_reason(exc)}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{label} is {_file_kind(info.st_mode)}, not {expected}.")
    return info


@contextmanager
def _open_regular(path: Path, label: str) -> Iterator[BinaryIO]:
    """`path` open for reading, still a regular file once opened; an OSError while it is read
    is a SourceError naming it as `label`."""
    try:
        # O_NONBLOCK: should the path become a FIFO between stat and open, open() must not wait
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise SourceError(f"{label} is not a regular file.")
            yield fh
    except OSError as exc:
        raise SourceError(f"Cannot read {label}: {_reason(exc)}.") from None


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """At most `limit` bytes of a regular file; anything else (a FIFO, a device, a directory, a
    dangling link, a file larger than `limit`) is a SourceError, never a hang or a whole read."""
    label = f"{what} {path}"
    info = _stat_regular(path, label, "a regular file", shown=f"{what} {_short(str(path))}")
    if info.st_size > limit:
        raise SourceError(f"{label} is {info.st_size:,} bytes, more than the {limit // 2**20} MiB "
                          "vramplan reads from such a file.")
    with _open_regular(path, label) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SourceError(f"{what} {path} is larger than the {limit // 2**20} MiB vramplan reads from such a file.")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _short(text: str, limit: int = 80) -> str:
    """A user-given string fit for one sentence: control characters escaped, length bounded."""
    shown = ascii(text)[1:-1] if not text.isprintable() else text
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def read_json_file(path: Path, what: str = "config", limit: int = CONFIG_LIMIT) -> dict[str, Any]:
    data = read_regular_file(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start}).") from None
    return _parse_json(text, str(path))


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
    except RecursionError:
        raise SourceError(f"{where} nests deeper than any config (more than {JSON_DEPTH_LIMIT} levels).") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise SourceError(f"{where} is not usable JSON ({str(exc).split(';')[0].rstrip('.')}).") from None
    if not isinstance(data, dict):
        raise SourceError(f"{where} must hold a JSON object, not {type(data).__name__}.")
    if _depth(data) > JSON_DEPTH_LIMIT:
        raise SourceError(f"{where} nests deeper than any config (more than {JSON_DEPTH_LIMIT} levels).")
    return data


def _depth(data: Any) -> int:
    """How deeply lists and objects nest, counted without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth > JSON_DEPTH_LIMIT:
                return depth
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Names, dtypes and shapes from a .safetensors file's header; the tensor data is not read."""
    info = _stat_regular(path, str(path), "a safetensors file")
    with _open_regular(path, str(path)) as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SourceError(f"{path} is too short to be a safetensors file.")
        (length,) = struct.unpack("<Q", raw)
        if length > SAFETENSORS_HEADER_LIMIT or length > info.st_size - 8:
            raise SourceError(f"{path} has an implausible safetensors header size ({length} bytes).")
        body = fh.read(length)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}'s safetensors header is not UTF-8 (invalid byte at offset {exc.start}).") from None
    return stored_from_header(_parse_json(text, f"{path}'s safetensors header"), str(path))


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8:
        raise SourceError(f"{where}: shape must be a list of at most 8 dimensions, not {_short(repr(value))}.")
    dims = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise SourceError(f"{where}: shape must hold non-negative integers, not {_short(repr(d))}.")
        dims.append(d)
    if math.prod(dims) > MAX_TENSOR_ELEMENTS:
        raise SourceError(f"{where}: shape {dims} holds more elements than any checkpoint.")
    return tuple(dims)


def stored_from_header(header: dict[str, Any], where: str = "safetensors header") -> dict[str, StoredTensor]:
    """Validated tensors of one header: every dtype known, every shape a list of small ints."""
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        here = f"{where}, tensor {_short(str(name), 60)}"
        if not isinstance(info, dict):
            raise SourceError(f"{here}: must be an object with dtype and shape.")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype.upper() not in SAFETENSORS_DTYPE_BITS:
            raise SourceError(f"{here}: unknown dtype {_short(repr(dtype), 40)}; known: "
                              f"{', '.join(SAFETENSORS_DTYPE_BITS)}.")
        tensors[name] = StoredTensor(dtype.upper(), _shape(info.get("shape"), here))
    return tensors


def _from_directory(directory: Path) -> ModelSource:
    config_path = directory / "config.json"
    if not os.path.lexists(config_path):
        raise SourceError(f"{directory} has no config.json; pass a model directory, a config.json, "
                          "a Hub id or a bundled name (see `vramplan models`).")
    config = read_json_file(config_path)
    stored: dict[str, StoredTensor] = {}
    try:
        files = sorted(directory.glob("*.safetensors"))[:10_000]
    except OSError as exc:
        raise SourceError(f"Cannot list {directory}: {_reason(exc)}.") from None
    for file in files:
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
            HFValidationError,
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
    except HFValidationError:
        raise SourceError(f"{_short(repo_id)!r} is not a valid Hub id (owner/name of letters, digits, '-', '_' "
                          "and '.', at most 96 characters each).") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as exc:
        if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
            raise SourceError(f"{repo_id} has no config.json.") from None
        raise SourceError(
            f"{repo_id!r} is neither a local path nor a bundled model, and the Hub cannot be "
            "reached (offline, or not in the local cache); see `vramplan models` for bundled names."
        ) from None
    config = read_json_file(Path(path), f"{repo_id}'s config.json")
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
    try:
        for file_meta in meta.files_metadata.values():
            header = {name: {"dtype": info.dtype, "shape": list(info.shape)}
                      for name, info in file_meta.tensors.items()}
            stored.update(stored_from_header(header, f"{repo_id}'s safetensors header"))
    except SourceError:  # a refinement: an odd header leaves the config's estimate
        return None
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
    if len(reference) > 4096 or "\x00" in reference:
        raise SourceError(f"{_short(reference)!r} is not a model reference: too long or holding a NUL character.")
    path = Path(reference).expanduser()
    try:
        exists = os.path.lexists(path)
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system is no path
        exists = is_dir = False
    if is_dir:
        return _from_directory(path)
    if exists:  # a file, FIFO, device or dangling link: read_regular_file says which
        return ModelSource(str(path), "file", read_json_file(path))
    if revision is None:
        bundled = load_bundled(reference)
        if bundled is not None:
            return bundled
    looks_like_path = reference.startswith((".", "/", "~")) or reference.endswith(".json") \
        or os.sep in reference.strip("/").split("/", 1)[-1]
    if looks_like_path or reference.count("/") != 1:
        raise SourceError(f"{_short(reference)!r} is not an existing path, a bundled model or a Hub id "
                          "(owner/name); `vramplan models` lists the bundled ones.")
    if not HUB_ID.fullmatch(reference) or len(reference.split("/")[1]) > 96:
        raise SourceError(f"{_short(reference)!r} is not an existing path, a bundled model or a valid Hub id "
                          "(owner/name of letters, digits, '-', '_' and '.', at most 96 characters each).")
    return _from_hub(reference, revision)
