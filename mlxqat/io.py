"""Saving and loading mlx-lm model directories, with a sha256 manifest; every write is safe.

A saved directory is an ordinary mlx-lm model directory (``mlx_lm.load``
opens it) plus ``mlxqat.json``: the recipe, training summary and metrics, the
sha256 of every other file, and a digest of the manifest itself. :func:`verify`
refuses a directory with an extra, missing or changed file, or an edited manifest.

Writes follow one destination rule (:func:`check_destination`): an existing
path is replaced only when it is a previous mlxqat output (a directory whose
manifest lists all its files, or a GGUF file mlxqat wrote), never the source
model, the working directory or one of its parents, a device, a link or a
folder holding anything else, and only where this process can create files.
Replacement is atomic: the new version is built in a temporary sibling
``.NAME.tmp-PID@HOST-XXXXXXXX``; the old one is renamed to ``.NAME.mlxqat-old``
and the new one into place; a run killed between the two renames is repaired
(the old version restored) by the next write to the same path, by :func:`load`
or by :func:`verify`, which also remove the temporaries of writers that died.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from ._version import __version__
from .layers import ActQuantizedLinear, is_fake_quant
from .validate import check_config_values, check_model_type, read_json_file

MANIFEST = "mlxqat.json"
FORMAT_VERSION = 2
# keys of mlxqat.json that the writer owns; ``info`` cannot set them
RESERVED_KEYS = ("format", "format_version", "kind", "mlxqat_version", "files", "manifest_sha256")
ACTIVATION_FILE = "activation_scales.safetensors"
MASTER_FILE = "master_weights.safetensors"
MAX_SHARD_BYTES = 5 << 30
MAX_MANIFEST_BYTES = 64 << 20

PathLike = Union[str, os.PathLike]


class IntegrityError(ValueError):
    """A file of a saved model does not match its manifest (``problems``: one line per file, when known)."""

    problems: list = []


class DestinationError(ValueError):
    """An output path that mlxqat must not write: it holds something that is not mlxqat's."""


# ---------------------------------------------------------------------------
# The destination rule
# ---------------------------------------------------------------------------


def _walk_entries(root: Path) -> Iterator[tuple]:
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
        from .validate import read_gguf

        field = read_gguf(path).get_field("general.quantized_by")
        return field.contents() if field is not None else None
    except Exception:  # any damage means "not one of ours"
        return None


def is_mlxqat_output(path: PathLike) -> bool:
    """True if ``path`` is something mlxqat wrote and may replace as a whole.

    A directory qualifies when its ``mlxqat.json`` is an mlxqat manifest and
    every file under it is listed there (an empty directory qualifies too:
    nothing is lost by replacing it); a file when it is a GGUF whose
    ``general.quantized_by`` names mlxqat.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode):
        writer = _gguf_writer(path)
        return isinstance(writer, str) and writer.startswith("mlxqat")
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        entries = list(_walk_entries(path))
    except OSError:
        return False
    if not entries:
        return True
    manifest = Manifest.peek(path)
    if manifest is None:
        return False
    if manifest.get("kind") == "work":  # a training work directory: all of it is ours
        return True
    listed = _listed_files(path)
    return all(stat.S_ISDIR(s.st_mode) or (stat.S_ISREG(s.st_mode) and n in listed) for n, s in entries)


def _listed_files(path: Path) -> set:
    """Names an mlxqat manifest in ``path`` lists (empty if there is none or it is unreadable)."""
    manifest = Manifest.peek(path)
    try:
        return set(manifest.get("files") or {}) | {MANIFEST} if manifest is not None else set()
    except (AttributeError, TypeError):
        return set()


def _describe(path: Path, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        listed = _listed_files(path)
        try:
            names = sorted(n for n, s in _walk_entries(path) if not stat.S_ISDIR(s.st_mode) and n not in listed)
        except OSError:
            names = []
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a folder holding files mlxqat did not write ({shown})" if names else "a folder mlxqat did not write"
    if stat.S_ISREG(st.st_mode):
        return "a file mlxqat did not write"
    return "a device or special file"


def _inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or lies under it."""
    return a == b or b in a.parents


def check_destination(dest: PathLike, *, sources: Iterable[PathLike] = (), kind: str = "dir") -> Path:
    """Check that ``dest`` may be (re)written by mlxqat; return it as a Path.

    Args:
        dest: the output path.
        sources: the inputs of the command (the model being read): ``dest`` may be
            neither one of them, nor inside one, nor contain one.
        kind: ``"dir"`` or ``"file"``: what will be written at ``dest``.

    Raises:
        DestinationError: naming the path, what is there and the fix.
    """
    if dest is None or str(dest).strip() == "":
        raise DestinationError("the output path is empty; name a new directory or file, e.g. --out qat-out")
    dest = Path(dest).expanduser()
    recover_interrupted(dest)
    resolved = dest.resolve()
    fix = "choose a new path for the output"
    if _inside(Path.cwd().resolve(), resolved):
        raise DestinationError(
            f"{dest} is the current directory or one of its parents; mlxqat writes its output as a "
            f"new folder and would replace everything there: {fix} (e.g. --out qat-out)"
        )
    for src in sources:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(resolved, s) or _inside(s, resolved):
            raise DestinationError(f"{dest} is (or holds, or lies inside) the source model {src}; {fix}")
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        _check_writable_parent(dest, fix)
        return dest
    wanted = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
    if wanted(st.st_mode) and is_mlxqat_output(dest):
        _check_writable_parent(dest, fix)
        return dest
    what = "directory" if kind == "dir" else "file"
    raise DestinationError(
        f"{dest} already exists and is {_describe(dest, st)}; mlxqat only replaces its own earlier "
        f"outputs, so nothing was written: {fix} (a new {what}), or move {dest} away yourself"
    )


def _check_writable_parent(dest: Path, fix: str) -> None:
    """The folder ``dest`` goes in exists (or can be created) and this process can create files there.

    Tried, not read from permission bits (which root, read-only mounts and /proc
    do not honour): a temporary file is created and removed in the nearest
    existing folder above ``dest``.
    """
    ancestor = Path(os.path.abspath(dest)).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DestinationError(f"{ancestor} is not a directory, so {dest} cannot be created; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=ancestor)
    except OSError as e:
        raise DestinationError(
            f"{dest} cannot be written: {ancestor} is not writable (creating a file there failed: {e.strerror}); "
            f"{fix} in a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _backup_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.mlxqat-old"


# which machine wrote a temporary (processes of one run may share a file system across machines)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(dest: Path) -> str:
    """How the temporary siblings of ``dest`` are named: ``.NAME.tmp-PID@HOST-`` and tempfile's 8 characters.

    The writer's process id and machine let :func:`_remove_stale_temporaries`
    tell a temporary whose writer died from one still being written.
    """
    return f".{dest.name}.tmp-{os.getpid()}@{_HOST}-"


def _process_alive(pid: int) -> bool:
    """False only when no process ``pid`` exists on this machine (when unsure: alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or not a pid at all: leave it
        return True
    return True


def _remove_stale_temporaries(dest: Path) -> list:
    """Remove temporaries of ``dest`` that mlxqat writers on this machine left when they were killed.

    Only names :func:`_temp_prefix` makes for ``dest``, written on this machine
    by a process that no longer exists; anything else (other names, a live
    writer's temporary, older temporaries without a process id) is left alone.

    Returns:
        The names removed.
    """
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.tmp-(\d+)@{_HOST}-[a-z0-9_]{{8}}")
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                _remove(dest.parent / name)
                removed.append(name)
    if removed:
        print(f"note: removed {', '.join(removed)}, left in {dest.parent} by an interrupted write of {dest.name}",
              file=sys.stderr)
    return removed


def recover_interrupted(dest: PathLike) -> Optional[str]:
    """Finish or undo a replacement of ``dest`` that was killed between its two renames.

    Temporaries of ``dest`` whose writer died are removed too (:func:`_remove_stale_temporaries`).

    Returns:
        ``"restored"`` (the old version is back at ``dest``), ``"cleaned"`` (the
        new version was in place; the stale old copy was removed), or None.
    """
    dest = Path(dest)
    _remove_stale_temporaries(dest)
    backup = _backup_path(dest)
    if not os.path.lexists(backup):
        return None
    if not os.path.lexists(dest):
        os.rename(backup, dest)
        print(f"note: restored {dest} from an interrupted replacement ({backup.name})", file=sys.stderr)
        return "restored"
    if is_mlxqat_output(backup):
        _remove(backup)
        return "cleaned"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``, keeping the old ``dest`` until the new one is in place."""
    if os.path.lexists(dest):
        if not is_mlxqat_output(dest):  # changed since it was checked
            raise DestinationError(f"{dest} changed while mlxqat was writing and is no longer its own output; nothing was replaced")
        backup = _backup_path(dest)
        os.rename(dest, backup)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        _remove(backup)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def _naming(dest: Path) -> Iterator[None]:
    """Report an OS error while starting to write ``dest`` as an error about ``dest`` (not a temporary name)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot create {dest} ({e.strerror})", str(dest)) from e


@contextlib.contextmanager
def atomic_dir(dest: PathLike, *, sources: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``dest`` when the body succeeds.

    ``dest`` must pass :func:`check_destination`. If the body raises (or the
    process dies), ``dest`` keeps its previous content or stays absent, and the
    temporary directory is removed (after a kill, left as ``.NAME.tmp-*`` until the
    next write to ``dest`` removes it).
    """
    dest = check_destination(dest, sources=sources, kind="dir")
    with _naming(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(dest: PathLike, *, sources: Iterable[PathLike] = (), check: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file path that becomes ``dest`` when the body succeeds.

    For writers that open files by name (``gguf.GGUFWriter``). ``dest`` must
    pass :func:`check_destination` (unless ``check=False``: a file inside a
    directory mlxqat owns, such as a training work directory).
    """
    dest = check_destination(dest, sources=sources, kind="file") if check else Path(dest)
    if not check:  # check_destination cleans up after killed writers; here, in a directory mlxqat owns, do it now
        _remove_stale_temporaries(dest)
    with _naming(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check and os.path.lexists(dest) and not is_mlxqat_output(dest):
            raise DestinationError(f"{dest} changed while mlxqat was writing; nothing was replaced")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest: PathLike, mode: str = "wb", *, check: bool = True):
    """Open a temporary sibling of ``dest`` for writing; it becomes ``dest`` on success (see :func:`atomic_path`)."""
    with atomic_path(dest, check=check) as tmp:
        with open(tmp, mode) as f:
            yield f


def check_work_dir(path: PathLike, *, sources: Iterable[PathLike] = ()) -> Path:
    """Check that ``path`` may serve as an mlxqat working directory (see :func:`work_dir`); create nothing."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not is_mlxqat_output(path):
        check_destination(path, sources=sources, kind="dir")
    return path


def work_dir(path: PathLike, *, sources: Iterable[PathLike] = ()) -> Path:
    """Create (or reuse) a working directory that mlxqat owns, e.g. ``<out>.train/``.

    It is marked by an ``mlxqat.json`` of kind ``work``; an existing path
    without that mark (unless an empty folder) is refused like any destination.
    The directory appears with its mark already inside (built as a temporary
    sibling, then renamed), so processes of one distributed run that create it
    at the same time all see a marked directory.
    """
    path = check_work_dir(path, sources=sources)
    if (path / MANIFEST).is_file():
        return path
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        (tmp / MANIFEST).write_text(Manifest.work_mark())
        try:
            os.rename(tmp, path)  # replaces an empty folder; fails if another process got there first
        except OSError:
            if not (path / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check_work_dir(path, sources=sources)


def remove_output(path: PathLike) -> None:
    """Delete ``path`` only if it is an mlxqat output (e.g. an old checkpoint); refuse otherwise."""
    path = Path(path)
    if not is_mlxqat_output(path):
        raise DestinationError(f"{path} is not an mlxqat output; it was not deleted")
    _remove(path)


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------


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
        for name, st in sorted(_walk_entries(directory)):
            if stat.S_ISDIR(st.st_mode) or name == MANIFEST:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{directory / name} is not a regular file; a model directory holds files only")
            manifest.files[name] = sha256_file(directory / name)
        return manifest

    def write(self, directory: PathLike) -> dict:
        """Write ``mlxqat.json`` into ``directory`` (atomically); returns :meth:`to_dict`.

        Raises:
            ValueError: an entry holds NaN or Inf.
        """
        directory = Path(directory)
        try:
            text = self.text()
        except ValueError as e:
            raise ValueError(f"the manifest of {directory} cannot hold NaN or Inf ({e}); leave such metrics out") from e
        with atomic_file(directory / MANIFEST, "w", check=False) as f:
            f.write(text)
        return self.to_dict()

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
        for name, st in _walk_entries(directory):
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


def write_manifest(directory: PathLike, info: Dict[str, Any], *, kind: str = "model") -> dict:
    """Write ``mlxqat.json`` into ``directory``: ``info``, the sha256 of every other file, a self-digest.

    Raises:
        ValueError: ``info`` sets a reserved key, holds NaN/Inf, or the directory
            holds something other than regular files and folders.
    """
    return Manifest.for_files(directory, info, kind=kind).write(directory)


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


def verify(directory: PathLike) -> dict:
    """Check a saved directory against ``mlxqat.json``: every file listed, unchanged, nothing else.

    A directory whose replacement was killed between its two renames is
    repaired first, as every command does (:func:`recover_interrupted`).

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no directory or no manifest.
        IntegrityError: the manifest was edited or damaged; a file is missing,
            extra, changed, or not a regular file.
    """
    directory = Path(directory)
    recover_interrupted(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: nothing to verify (expected a model directory with {MANIFEST})")
    manifest = Manifest.read(directory)
    problems = manifest.problems(directory)
    if problems:
        error = IntegrityError(
            f"{directory} failed verification ({len(problems)} problem(s)): " + "; ".join(problems[:5])
            + ". The directory changed after it was saved: re-export or re-download the model"
        )
        error.problems = problems
        raise error
    return manifest.to_dict()


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def model_config(model: nn.Module) -> dict:
    """The mlx-lm config dict of ``model`` (from its ``args`` dataclass)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError(
            f"{type(model).__name__} has no mlx-lm `args`; pass config= (the dict "
            "mlx_lm.load(..., return_config=True) returns) to save()"
        )
    # a field the source config did not set holds its default None: leave it out rather than write null, which
    # transformers' config classes (read by the tokenizer loader, in mlxqat.load and mlx_lm.load) refuse
    unset = {f.name for f in dataclasses.fields(args) if f.default is None}
    cfg = {k: v for k, v in dataclasses.asdict(args).items() if not (v is None and k in unset)}
    if "tie_word_embeddings" not in cfg and hasattr(model, "tie_word_embeddings"):
        cfg["tie_word_embeddings"] = bool(model.tie_word_embeddings)
    return cfg


def quantization_config(model: nn.Module) -> Optional[dict]:
    """mlx-lm's ``"quantization"`` entry: the common setting plus per-layer overrides."""
    from .convert import layer_specs

    specs = layer_specs(model)
    if not specs:
        return None
    common = Counter(tuple(sorted(s.items())) for s in specs.values()).most_common(1)[0][0]
    default = dict(common)
    q = {"group_size": default["group_size"], "bits": default["bits"], "mode": default["mode"]}
    for path, s in specs.items():
        if s != default:
            q[path] = s
    return q


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------


def _make_shards(weights: Dict[str, mx.array], max_bytes: int):
    shards, size = [], 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def _write_weights(directory: Path, weights: Dict[str, mx.array], max_shard_bytes: int) -> None:
    shards = _make_shards(weights, max_shard_bytes)
    n = len(shards)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        for k in shard:
            index["weight_map"][k] = name
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


def _compact_scales(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """float32 scales/biases that are float16 numbers -> float16 (same values, half the bytes).

    Only for linear layers: ``quantized_matmul`` promotes to the activation
    dtype, so a float32 model computes the same numbers. Embeddings keep their
    dtype because their output dtype would follow it.
    """
    from .quant import compact

    for path, m in model.named_modules():
        if type(m).__name__ == "QuantizedEmbedding" or not isinstance(m, nn.QuantizedLinear):
            continue
        scales, biases = weights.get(f"{path}.scales"), weights.get(f"{path}.biases")
        if scales is None or scales.dtype != mx.float32:
            continue
        halves = compact(scales, biases, mx.float16)
        if halves is not None:
            weights[f"{path}.scales"], weights[f"{path}.biases"] = halves


def format_size(n: int) -> str:
    """``"1.234 MB"``, or ``"12,345 B"`` below 100 kB."""
    return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n:,} B"


def _card_metrics(info: dict) -> dict:
    """The measured figures of a manifest: ``metrics``, then the training summary's scalars."""
    m = dict(info.get("metrics") or {})
    for k, v in (info.get("training") or {}).items():
        if isinstance(v, (int, float, str)):
            m.setdefault(f"training.{k}", v)
    return m


def _card_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):  # a row of figures, e.g. {"ppl": 12.3, "kl": 0.01}
        return ", ".join(f"{k} {_card_value(x)}" for k, x in v.items())
    return str(v)


def model_card(title: str, info: Dict[str, Any], memory: Optional[dict] = None, *, notes: str = "") -> str:
    """The README.md of a saved model directory (one card for :func:`save`, the exports and training).

    Args:
        title: heading (the model's name).
        info: the manifest entries: ``recipe`` (a recipe dictionary, or None: not
            quantized by mlxqat), ``metrics``, ``training``, ``exported_from``.
        memory: a memory report dictionary (:meth:`mlxqat.export.MemoryReport.to_dict`).
        notes: extra paragraphs.
    """
    source = info.get("exported_from") or ""
    lines = [f"# {title}", ""]
    lines.append(f"Made by mlxqat {__version__}" + (f" from `{source}`." if source else "."))
    lines += ["", "## Quantization", ""]
    recipe = info.get("recipe")
    if recipe:
        d = recipe.get("default", {})
        lines.append(
            f"Recipe `{recipe.get('name')}`: {recipe.get('description') or 'custom'}. "
            f"Default layer: {d.get('bits')}-bit, group {d.get('group_size')}, {d.get('mode')}"
            + (", learned scales" if d.get("learn_scales") else "")
            + (f", {d.get('act_bits')}-bit activations" if d.get("act_bits") else "")
            + "."
        )
        for pattern, spec in recipe.get("overrides", []):
            lines.append(f"- `{pattern}`: {spec.get('bits')}-bit, group {spec.get('group_size')}, {spec.get('mode')}")
        for pattern in recipe.get("skip", []):
            lines.append(f"- `{pattern}`: full precision")
    else:
        lines.append("No mlxqat recipe recorded for these weights.")
    if memory:
        lines += [
            "",
            "## Size",
            "",
            "| weights | bits per weight | size vs bf16 | values |",
            "|---|---|---|---|",
            f"| {format_size(memory['weight_bytes'])} | {memory['bits_per_weight']:.3f} | {memory['ratio_to_bf16']:.3f}x "
            f"| {memory['n_weights']:,} |",
        ]
    lines += ["", "## Measured", ""]
    metrics = _card_metrics(info)
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_card_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No metrics were recorded with this model.")
    if notes:
        lines += ["", notes]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from mlx_lm import load, generate",
        'model, tokenizer = load("path/to/this/folder")',
        'print(generate(model, tokenizer, "def fibonacci(n):", max_tokens=64))',
        "```",
        "",
        "`python -m mlxqat.verify path/to/this/folder` checks every file against the sha256 in `mlxqat.json`.",
        "",
    ]
    return "\n".join(lines)


def save(
    model: nn.Module,
    tokenizer,
    path: PathLike,
    *,
    config: Optional[dict] = None,
    info: Optional[Dict[str, Any]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_files: Optional[Dict[str, Union[str, bytes]]] = None,
    master_weights: Optional[Dict[str, mx.array]] = None,
    compact_scales: bool = True,
    sources: Iterable[PathLike] = (),
    title: Optional[str] = None,
    notes: str = "",
) -> dict:
    """Write a converted model as an mlx-lm directory (``mlx_lm.load(path)`` opens it).

    Args:
        model: a converted model (``mlxqat.convert``) or a full-precision one.
        tokenizer: the tokenizer (``mlx_lm`` TokenizerWrapper or a Hugging Face
            tokenizer); its files are saved beside the weights.
        path: destination directory: new, empty, or an earlier mlxqat output
            (replaced atomically); anything else is refused (:func:`check_destination`).
        config: the model's config dict; default: built from ``model.args``.
        info: extra entries for ``mlxqat.json`` (training summary, metrics). The
            recipe is read from the model's layers (:func:`mlxqat.convert.recipe_of`).
        max_shard_bytes: shard the weights above this size.
        extra_files: ``{name: text or bytes}`` written into the directory.
        master_weights: unquantized weights to keep beside the model
            (``master_weights.safetensors``, e.g. the trained QAT weights).
        compact_scales: store float32 scales/biases of linear layers as float16
            when that is lossless (the values are float16 numbers).
        sources: the paths the model was read from; ``path`` may not be or hold one.
        title, notes: the heading (default: the directory's name) and extra text of
            the model card ``README.md`` (:func:`model_card`) written beside the weights.

    Returns:
        The manifest written to ``mlxqat.json``.

    Raises:
        ValueError: fake-quant layers still present, non-finite weights, no
            tokenizer, a reserved ``info`` key or an ``extra_files`` name outside
            the directory.
        DestinationError: ``path`` holds something that is not an mlxqat output.
    """
    fq = [p for p, m in model.named_modules() if is_fake_quant(m)]
    if fq:
        raise ValueError(
            f"{len(fq)} layer(s) are still fake-quant (e.g. {fq[0]}); call "
            "mlxqat.convert(model) before save()"
        )
    if tokenizer is None:
        raise ValueError(
            "save() needs the tokenizer: mlx_lm.load reads tokenizer files from the "
            "model directory; pass the tokenizer returned by mlx_lm.load / mlxqat.load"
        )
    Manifest(info=dict(info or {}))  # a reserved key in info is refused now, before any work
    for name in extra_files or {}:
        check_member_name(name)
        if name == MANIFEST or name == "config.json" or name.startswith("model"):
            raise ValueError(f"extra_files name {name!r} would replace a file of the model; choose another name")
    check_destination(path, sources=sources)
    config = dict(config if config is not None else model_config(model))
    if "model_type" not in config:
        raise ValueError("config has no 'model_type'; mlx-lm cannot tell which architecture to build")
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    q = quantization_config(model)
    if q is not None:
        config["quantization"] = q
        config["quantization_config"] = q

    weights = dict(tree_flatten(model.parameters()))
    act_scales = {k: v for k, v in weights.items() if k.endswith(".act_scale")}
    act_bits = {}
    for k in act_scales:
        weights.pop(k)
    for p, m in model.named_modules():
        if isinstance(m, ActQuantizedLinear):
            act_bits[p] = m.act_bits
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.all(mx.isfinite(v)).item()):
            raise ValueError(f"{k} has NaN/Inf values; refusing to save a broken model")
    if compact_scales:
        _compact_scales(model, weights)

    from .convert import recipe_of
    from .export import memory_report

    recipe = recipe_of(model)
    manifest_info = {"recipe": recipe.to_dict() if recipe is not None else None}
    manifest_info["activation_quantization"] = act_bits
    manifest_info.update(info or {})
    extra_files = dict(extra_files or {})
    if "README.md" not in extra_files:
        memory = memory_report(model, params=weights).to_dict()
        extra_files["README.md"] = model_card(title or Path(path).name, manifest_info, memory, notes=notes)

    with atomic_dir(path, sources=sources) as tmp:
        _write_weights(tmp, weights, max_shard_bytes)
        if master_weights:
            mx.save_safetensors(str(tmp / MASTER_FILE), master_weights, metadata={"format": "mlx"})
        if act_scales:
            mx.save_safetensors(str(tmp / ACTIVATION_FILE), act_scales, metadata={"format": "mlxqat"})
        with open(tmp / "config.json", "w") as f:
            json.dump(dict(sorted(config.items())), f, indent=2)
        tokenizer.save_pretrained(str(tmp))
        for name, content in extra_files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, mode) as f:
                f.write(content)
        manifest = write_manifest(tmp, manifest_info)
    return manifest


def _attach_recipe(model: nn.Module, manifest: dict, directory: Path) -> None:
    """Give the loaded quantized layers their specs from the manifest's recipe (:func:`mlxqat.convert.recipe_of`
    then reads it back from them)."""
    if not manifest.get("recipe"):
        return
    from .convert import attach_recipe
    from .recipes import Recipe

    try:
        attach_recipe(model, Recipe.from_dict(manifest["recipe"]))
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{directory}/{MANIFEST}: the recipe entry is damaged ({e})") from e


def _restore_activation_quant(model: nn.Module, directory: Path, manifest: dict) -> None:
    from .validate import safetensors_header

    act_bits = manifest.get("activation_quantization") or {}
    if not act_bits:
        return
    if not isinstance(act_bits, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in act_bits.values()
    ):
        raise ValueError(f"{directory}/{MANIFEST}: activation_quantization must map layer paths to bit widths")
    header = safetensors_header(directory / ACTIVATION_FILE)
    scales = mx.load(str(directory / ACTIVATION_FILE))
    modules = dict(model.named_modules())
    for path in act_bits:
        entry = header.get(f"{path}.act_scale")
        if not isinstance(modules.get(path), nn.QuantizedLinear) or entry is None or entry != (entry[0], ()) or entry[0] not in ("F16", "BF16", "F32"):
            raise ValueError(
                f"{directory}: activation quantization of {path!r} does not match the model "
                f"(no such quantized layer, or no scalar {path}.act_scale in {ACTIVATION_FILE})"
            )

    def swap(path, m):
        if path in act_bits and isinstance(m, nn.QuantizedLinear):
            out_dims, packed_in = m.weight.shape
            in_dims = packed_in * 32 // m.bits
            aq = ActQuantizedLinear(in_dims, out_dims, "bias" in m, m.group_size, m.bits, act_bits[path])
            aq.update(dict(m.items()))
            aq.act_scale = scales[f"{path}.act_scale"]
            aq.freeze()
            return aq
        return m

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def check_config(directory: PathLike) -> dict:
    """Read ``config.json`` and check its types and bounds (:mod:`mlxqat.validate`); clear errors if not."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not os.path.lexists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist: {directory} is not an mlx-lm model directory")
    cfg = read_json_file(cfg_path, "config.json")
    check_config_values(cfg, str(cfg_path))
    if "model_type" not in cfg:
        raise ValueError(f"{cfg_path} has no 'model_type'; add the architecture name (e.g. \"llama\")")
    check_model_type(cfg, str(cfg_path))
    return cfg


_warned_unverified: set = set()


def _smoke_test(model: nn.Module, directory: Path) -> None:
    """Run two tokens through the model: a config the architecture code cannot run is refused at load time."""
    try:
        mx.eval(model(mx.array([[0, 0]], dtype=mx.int32)))
    except Exception as e:  # the architecture's own code raising on an inconsistent config
        raise ValueError(
            f"{directory}: the model does not run with its config.json ({type(e).__name__}: {e}); "
            "restore config.json from the original model"
        ) from e


def _checked_classes(tensors: dict, directory: Path):
    """mlx-lm's model classes, with the built model checked against the files before it is quantized."""
    from mlx_lm.utils import _get_classes

    from .validate import check_layers_against_files, check_output_layer

    def get(config: dict):
        model_class, args_class = _get_classes(config)

        def build(args):
            model = model_class(args)
            check_layers_against_files(model, tensors, config, str(directory))
            check_output_layer(model, tensors, config, directory)
            return model

        return build, args_class

    return get


def _resolve_model_path(path: PathLike) -> Path:
    """A local directory, or a Hugging Face id resolved to its local snapshot (downloading it)."""
    p = Path(path).expanduser()
    recover_interrupted(p)
    if os.path.lexists(p):
        return p
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or p.suffix:
        raise FileNotFoundError(f"{path}: no such directory (the path does not exist), and not a Hugging Face id owner/name")
    from mlx_lm.utils import _download

    try:
        return Path(_download(text))
    except Exception as e:  # hub errors (offline, unknown repo) have many types
        raise FileNotFoundError(
            f"{path}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}); check the path or the repository id"
        ) from e


def load(
    path: Optional[PathLike] = None,
    *,
    verify_files: bool = True,
    kernel: str = "mlx",
    lazy: bool = False,
    return_config: bool = False,
    full_precision: bool = False,
):
    """Load a model directory saved by :func:`save`, any mlx-lm directory, a Hugging Face id, or a GGUF file.

    Before MLX reads anything: the manifest is verified when there is one (a
    directory without one loads with a warning), ``config.json`` and every
    safetensors header are checked, and the quantized layers' shapes are
    checked against each other; then the weights are read (unless ``lazy``) and
    must be finite. The tokenizer never runs code from the directory.

    Args:
        path: the model; ``None`` is the full-precision stdlib Llama shipped with mlxqat.
        full_precision: refuse a quantized model (for QAT's teacher and starting
            point, or a full-precision baseline).

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with ``return_config``.

    Raises:
        IntegrityError: a file does not match the manifest.
        ValueError / FileNotFoundError: a missing, malformed or inconsistent file,
            named in the message; with ``full_precision``, a quantized model.
    """
    if path is None:
        from .stdlib_data import embedded_model_path

        path = embedded_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the embedded model is missing from this installation ({path}); pass a "
                                    "model directory (--model DIR) or reinstall mlxqat")
    model, tokenizer, config = _load(path, verify_files, kernel, lazy)
    if full_precision:
        from .convert import layer_specs

        quantized = list(layer_specs(model))
        if quantized:
            raise ValueError(f"{path} is already quantized ({len(quantized)} quantized layers, e.g. {quantized[0]}); "
                             "pass its full-precision original")
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _load(path: PathLike, verify_files: bool, kernel: str, lazy: bool):
    from mlx_lm.utils import load_model, load_tokenizer

    from .validate import (check_directory_entries, check_finite, check_module_parameters, check_quantized_tensors,
                           check_weight_files)
    from .gguf_import import is_gguf_file, load_gguf

    if is_gguf_file(path):  # a GGUF file: dequantized in memory, tokenizer rebuilt (mlxqat.gguf_import)
        model, tokenizer, config = load_gguf(path)
        if kernel != "mlx":
            from .convert import use_kernel

            use_kernel(model, kernel)
        return model, tokenizer, config
    directory = _resolve_model_path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is neither a directory nor a GGUF file; pass the model's "
                                "directory (with config.json) or a GGUF file")
    manifest = {}
    if os.path.lexists(directory / MANIFEST):
        manifest = verify(directory) if verify_files else read_manifest(directory)
    elif str(directory) not in _warned_unverified:
        _warned_unverified.add(str(directory))
        warnings.warn(
            f"{directory} has no {MANIFEST}, so changes to its files cannot be detected; if you trust "
            f"them, add one with `python -m mlxqat.verify --write {directory}`",
            stacklevel=3,
        )
    check_directory_entries(directory)
    config = check_config(directory)
    tensors = check_weight_files(directory)
    check_quantized_tensors(tensors, config, str(directory))
    try:
        model, config = load_model(directory, lazy=True, get_model_classes=_checked_classes(tensors, directory))
    except FileNotFoundError:
        raise
    except ValueError as e:
        if str(e).startswith(str(directory)):  # one of our own checks: already names the directory
            raise
        raise ValueError(f"{directory}: the weights do not fit config.json ({e})") from e
    except Exception as e:  # a config the architecture cannot be built from
        raise ValueError(f"{directory}/config.json does not describe a loadable {config.get('model_type')} model "
                         f"({type(e).__name__}: {e}); restore it from the original model") from e
    check_module_parameters(model, str(directory))
    _restore_activation_quant(model, directory, manifest)
    if not lazy:
        mx.eval(model.parameters())
        check_finite(model, str(directory))
        _smoke_test(model, directory)
    try:
        tokenizer = load_tokenizer(directory, {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory}: the tokenizer files could not be read ({e})") from e
    except Exception as e:  # tokenizers raise their own exception types on damaged files
        raise ValueError(f"{directory}: the tokenizer files could not be read ({type(e).__name__}: {e})") from e
    _attach_recipe(model, manifest, directory)
    if kernel != "mlx":
        from .convert import use_kernel

        use_kernel(model, kernel)
    return model, tokenizer, config
