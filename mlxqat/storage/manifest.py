"""The sha256 manifest (``mlxqat.json``) of a directory mlxqat wrote, and what it says the directory owns."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from .._version import __version__
from ..gguf.format import read_gguf
from ..gguf.ollama import is_mlxqat_modelfile
from .checks import PathLike, read_json_file

MANIFEST = "mlxqat.json"


FORMAT_VERSION = 2


# keys of mlxqat.json that the writer owns; ``info`` cannot set them
RESERVED_KEYS = ("format", "format_version", "kind", "mlxqat_version", "files", "manifest_sha256")


ACTIVATION_FILE = "activation_scales.safetensors"


MASTER_FILE = "master_weights.safetensors"


MAX_MANIFEST_BYTES = 64 << 20


class IntegrityError(ValueError):
    """A file of a saved model does not match its manifest (``problems``: one line per file, when known)."""

    problems: list = []


def walk_entries(root: Path) -> Iterator[tuple]:
    """``(relative posix name, lstat)`` of everything under ``root`` (links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield Path(full).relative_to(root).as_posix(), os.lstat(full)


def _gguf_writer(path: Path) -> Optional[str]:
    """``general.quantized_by`` of a GGUF file, or None (not a readable GGUF)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None

        field = read_gguf(path).get_field("general.quantized_by")
        return field.contents() if field is not None else None
    except Exception:  # any damage means "not one of ours"
        return None


def is_mlxqat_output(path: PathLike) -> bool:
    """True if ``path`` is something mlxqat wrote and may replace as a whole.

    A directory qualifies when its ``mlxqat.json`` is an mlxqat manifest and
    every file under it is listed there (an empty directory qualifies too:
    nothing is lost by replacing it); a file when it is a GGUF whose
    ``general.quantized_by`` names mlxqat, or an Ollama Modelfile mlxqat wrote and nobody
    edited since (:func:`mlxqat.gguf.ollama.is_mlxqat_modelfile`).
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode):
        writer = _gguf_writer(path)
        return (isinstance(writer, str) and writer.startswith("mlxqat")) or is_mlxqat_modelfile(path)
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        entries = list(walk_entries(path))
    except OSError:
        return False
    if not entries:
        return True
    manifest = Manifest.peek(path)
    if manifest is None:
        return False
    if manifest.get("kind") == "work":  # a training work directory: all of it is ours
        return True
    listed = listed_files(path)
    return all(stat.S_ISDIR(s.st_mode) or (stat.S_ISREG(s.st_mode) and n in listed) for n, s in entries)


def listed_files(path: Path) -> set:
    """Names an mlxqat manifest in ``path`` lists (empty if there is none or it is unreadable)."""
    manifest = Manifest.peek(path)
    try:
        return set(manifest.get("files") or {}) | {MANIFEST} if manifest is not None else set()
    except (AttributeError, TypeError):
        return set()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SAFE_NAME = re.compile(r"^[^\x00-\x1f\\:]+$")


def check_member_name(name: Any, directory: PathLike = ".") -> str:
    """A file name inside a model directory: relative, no ``..``, no absolute or odd paths."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not _SAFE_NAME.match(name) or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts) or len(name) > 512):
        raise IntegrityError(
            f"{directory}: {name!r} is not a file name inside the directory (names are relative, "
            "without '..'); the manifest or the call is wrong"
        )
    return name


def _raise_damaged(path: Path, what: str) -> None:
    raise IntegrityError(f"{path}: {what}; the manifest is damaged")


@dataclasses.dataclass
class Manifest:
    """``mlxqat.json``: the one owner of its schema.

    On disk (format version 2) it is a JSON object with, in this order:
    ``format`` ("mlxqat"), ``format_version``, ``kind`` ("model", "checkpoint",
    "profile"), ``mlxqat_version``, the ``info`` entries (recipe, training
    summary, metrics, ...), ``files`` (``{name: sha256}`` of every other file)
    and ``manifest_sha256``, a digest of all the rest; the file is exactly
    :meth:`text`, so any edit is detected.
    """

    kind: str = "model"
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the entries below the header
    files: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> sha256, every other file
    mlxqat_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        clash = sorted(set(self.info) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"info sets {clash}, which mlxqat.json reserves for itself; rename those entries")

    # -- the document ------------------------------------------------------

    def _body(self) -> dict:
        body = {"format": "mlxqat", "format_version": self.format_version, "kind": self.kind,
                "mlxqat_version": self.mlxqat_version}
        body.update(self.info)
        body["files"] = self.files
        return body

    @staticmethod
    def _digest_of(body: dict) -> str:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def digest(self) -> str:
        """``manifest_sha256``: the sha256 of the canonical JSON of every other entry."""
        return self._digest_of(self._body())

    def to_dict(self) -> dict:
        """The manifest as written, ``manifest_sha256`` included."""
        d = self._body()
        d["manifest_sha256"] = self.digest()
        return d

    def text(self) -> str:
        """The exact text of ``mlxqat.json``: a manifest whose bytes differ from this was edited."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @staticmethod
    def peek(directory: PathLike) -> Optional[dict]:
        """The document of ``directory/mlxqat.json`` if it is an mlxqat manifest of any kind (not verified), else None."""
        try:
            path = Path(directory) / MANIFEST
            doc = json.loads(path.read_bytes()) if path.is_file() else None
        except (OSError, ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) and doc.get("format") == "mlxqat" else None

    @staticmethod
    def work_mark() -> str:
        """The text of the ``mlxqat.json`` that marks a training work directory (kind ``work``, no file list)."""
        return json.dumps({
            "format": "mlxqat", "kind": "work", "mlxqat_version": __version__,
            "note": "training work directory (checkpoints, log, teacher cache) written by mlxqat"})

    @staticmethod
    def info_of(doc: Any) -> dict:
        """The non-reserved entries of a manifest document (a dict read from JSON; anything else: none)."""
        return {k: v for k, v in doc.items() if k not in RESERVED_KEYS} if isinstance(doc, dict) else {}

    @classmethod
    def from_bytes(cls, raw: bytes, path: PathLike = MANIFEST) -> "Manifest":
        """Parse and check a manifest's bytes: format, version, file list, self-digest, exact text.

        Raises:
            IntegrityError: naming ``path`` and what is wrong.
        """
        path = Path(path)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise IntegrityError(f"{path} is not valid JSON ({e}). The manifest is damaged") from None
        if not isinstance(doc, dict) or doc.get("format") != "mlxqat":
            raise IntegrityError(f"{path} is not an mlxqat manifest; the manifest is damaged")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(
                f"{path} has format_version {version!r}; this mlxqat reads version {FORMAT_VERSION} (which also "
                f"guards the manifest itself). If you trust the files, run `python -m mlxqat.verify --write {path.parent}`"
            )
        files = doc.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in files.values()
        ):
            _raise_damaged(path, "'files' must map file names to sha256 digests")
        for name in files:
            check_member_name(name, path.parent)
        kind, version_str = doc.get("kind"), doc.get("mlxqat_version")
        if not isinstance(kind, str) or not isinstance(version_str, str):
            _raise_damaged(path, "'kind' and 'mlxqat_version' must be strings")
        manifest = cls(kind=kind, info=cls.info_of(doc), files=files, mlxqat_version=version_str)
        try:
            exact = manifest.text().encode() == raw and doc.get("manifest_sha256") == manifest.digest()
        except ValueError:  # NaN/Inf in an edited file
            exact = False
        if not exact:
            raise IntegrityError(
                f"{path} was edited after it was written (its manifest_sha256 does not match its content); "
                "re-export the model, or re-create the manifest with `python -m mlxqat.verify --write` if you made the edit"
            )
        return manifest

    # -- a directory -------------------------------------------------------

    @classmethod
    def for_files(cls, directory: PathLike, info: Optional[Dict[str, Any]] = None, *, kind: str = "model") -> "Manifest":
        """The manifest of ``directory`` as it is now: ``info`` plus the sha256 of every other file.

        Raises:
            ValueError: ``info`` sets a reserved key, or the directory holds
                something other than regular files and folders.
        """
        directory = Path(directory)
        manifest = cls(kind=kind, info=dict(info or {}))
        for name, st in sorted(walk_entries(directory)):
            if stat.S_ISDIR(st.st_mode) or name == MANIFEST:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{directory / name} is not a regular file; a model directory holds files only")
            manifest.files[name] = sha256_file(directory / name)
        return manifest

    @classmethod
    def read(cls, directory: PathLike) -> "Manifest":
        """Read and check ``directory/mlxqat.json`` (see :meth:`from_bytes`); the files are not hashed."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not os.path.lexists(path):
            raise FileNotFoundError(
                f"{path} does not exist: {directory} was not saved by mlxqat (or the manifest was removed); "
                f"if you trust its files, add one with `python -m mlxqat.verify --write {directory}`"
            )
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) or _is_hub_blob_link(directory, MANIFEST, st)):
            raise IntegrityError(f"{path} is not a regular file (a link, folder or device); the manifest is damaged")
        try:
            read_json_file(path, "the manifest", MAX_MANIFEST_BYTES)  # size, encoding and JSON checks
            raw = path.read_bytes()
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{e}. The manifest is damaged") from e
        return cls.from_bytes(raw, path)

    def problems(self, directory: PathLike) -> list:
        """One line per file of ``directory`` that is missing, extra, changed or not a regular file."""
        directory = Path(directory)
        problems, present, bad = [], set(), set()
        for name, st in walk_entries(directory):
            if stat.S_ISDIR(st.st_mode) or name == MANIFEST:
                continue
            if not (stat.S_ISREG(st.st_mode) or _is_hub_blob_link(directory, name, st)):
                problems.append(f"{name}: not a regular file")
                bad.add(name)
            elif name not in self.files:
                problems.append(f"{name}: not in the manifest (an added file)")
            present.add(name)
        for name, expected in self.files.items():
            if name not in present:
                problems.append(f"{name}: missing")
            elif name not in bad and sha256_file(directory / name) != expected:
                problems.append(f"{name}: content changed")
        return sorted(problems)


def read_manifest(directory: PathLike) -> dict:
    """Read and check ``mlxqat.json`` (format, file list, self-digest); the files are not hashed."""
    return Manifest.read(directory).to_dict()


def _is_hub_blob_link(directory: Path, name: str, st: os.stat_result) -> bool:
    """A Hugging Face cache snapshot's link to a regular file in the repository's ``blobs/``."""
    if not stat.S_ISLNK(st.st_mode) or directory.resolve().parent.name != "snapshots":
        return False
    blobs = directory.resolve().parent.parent / "blobs"
    target = (directory / name).resolve()
    return blobs in target.parents and target.is_file()
