"""Run the notebooks on the real model and store their outputs in them (``make notebooks-outputs``).

    tools/with-blas .venv/bin/python tools/notebook_outputs.py                 # every notebook
    tools/with-blas .venv/bin/python tools/notebook_outputs.py 01_qat_training # one (name or path)
    .venv/bin/python tools/notebook_outputs.py --check                         # which outputs are stale

Each notebook runs top to bottom in ``notebooks/``, where Jupyter runs it, with its first cell as
committed (``QUICK = False``: the real model that ``tools/fetch-models`` puts in ``.models/``). Its
outputs are written back into the ``.ipynb`` (widget state dropped: progress bars keep their text),
and its metadata ``mlxqat`` records the sha256 of its code cells (:func:`code_hash`), the command,
the machine and the time the run took. The last figure of each notebook is also written to
``docs/images/<notebook>.png`` (the README shows the first notebook's). The test suite compares that hash with the code: a code cell
changed without its outputs made again fails ``tests/test_notebooks.py``. A notebook that fails is
left as it was.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
IMAGES = ROOT / "docs" / "images"
WIDGET = "application/vnd.jupyter.widget-view+json"
COMMAND = "make notebooks-outputs"


def code_hash(nb) -> str:
    """The sha256 of a notebook's code cells, in order (markdown cells and outputs are not part of it)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8"))
            h.update(b"\n\0")
    return h.hexdigest()


def stale(path: Path) -> Optional[str]:
    """Why the outputs stored in notebook ``path`` are not those of its code, or ``None`` when they are."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    meta = nb.metadata.get("mlxqat")
    if not meta or "code_sha256" not in meta:
        return f"{path.name} has no stored outputs (no mlxqat.code_sha256 in its metadata); run `{COMMAND}`"
    if meta["code_sha256"] != code_hash(nb):
        return (f"{path.name}: its code cells changed after its outputs were made ({meta.get('date', '?')}); "
                f"run `{COMMAND}` (or `python tools/notebook_outputs.py {path.stem}`)")
    return None


def machine() -> str:
    import mlx.core as mx

    cores = os.cpu_count()
    device = mx.default_device()
    return (f"{platform.system()} {platform.machine()}, {cores} cores, {platform.processor() or 'cpu'}; "
            f"MLX {mx.__version__} on {device}; Python {platform.python_version()}")


def _as_terminal_shows(text: str) -> str:
    """``text`` as a terminal leaves it: each carriage return (a progress bar redrawing its line) keeps only
    what was written after it."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy(nb) -> None:
    """Outputs as a reader should see them, in place: widget state dropped (progress bars keep their text),
    consecutive stream outputs of a cell merged, and progress bars shown at their last state."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            data = out.get("data")
            if data and WIDGET in data:
                del data[WIDGET]
        merged = []
        for out in cell.outputs:
            if "data" in out and not out["data"]:
                continue
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _as_terminal_shows(out.text)
        cell.outputs = merged


def run(path: Path, timeout: int = 3600) -> dict:
    """Execute notebook ``path`` in its folder and store its outputs and metadata in it; returns the metadata."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    env_quick = os.environ.pop("MLXQAT_QUICK", None)  # the committed outputs are the full run's
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_quick is not None:
            os.environ["MLXQAT_QUICK"] = env_quick
    tidy(nb)
    meta = {
        "code_sha256": code_hash(nb),
        "command": COMMAND,
        "machine": machine(),
        "blas": "OpenBLAS (tools/with-blas)" if "openblas" in os.environ.get("LD_PRELOAD", "").lower() else "MLX's own",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - t0),
    }
    nb.metadata["mlxqat"] = meta
    _write(path, nbformat.writes(nb).encode("utf-8"))
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
    if pngs and path.resolve().parent == NOTEBOOKS:  # the repository's notebooks only
        IMAGES.mkdir(parents=True, exist_ok=True)
        _write(IMAGES / f"{path.stem}.png", base64.b64decode(pngs[-1]))
    return meta


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a new temporary file beside it: never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's file is owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _paths(names: List[str]) -> List[Path]:
    if not names:
        return sorted(NOTEBOOKS.glob("*.ipynb"))
    out = []
    for n in names:
        p = Path(n)
        if not p.exists():
            p = NOTEBOOKS / (n if n.endswith(".ipynb") else n + ".ipynb")
        if not p.is_file():
            print(f"no notebook {n!r}: give a name from {', '.join(q.stem for q in sorted(NOTEBOOKS.glob('*.ipynb')))}",
                  file=sys.stderr)
            raise SystemExit(2)
        out.append(p)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="Names or paths (default: every notebook in notebooks/).")
    p.add_argument("--check", action="store_true", help="Only report notebooks whose outputs are stale.")
    p.add_argument("--timeout", type=int, default=3600, help="Seconds one cell may run (default: 3600).")
    a = p.parse_args(argv)
    paths = _paths(a.notebooks)
    if a.check:
        problems = [s for s in map(stale, paths) if s]
        print("\n".join(problems) if problems else f"{len(paths)} notebooks: outputs match their code")
        return 1 if problems else 0
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        meta = run(path, a.timeout)
        print(f"  {path.name}: {meta['wall_s']} s, outputs stored", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
