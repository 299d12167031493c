"""Loader fuzzing: mutated model directories and GGUF files against mlxqat's loaders.

Builds seed inputs once (tiny models saved by ``mlxqat.save`` with and without
their ``mlxqat.json`` manifest, GGUF files written by ``export_gguf``), then
runs cases: case ``i`` of seed ``s`` copies one seed, mutates it with
``random.Random(f"{s}:{i}")`` (byte flips, truncation, JSON field edits,
safetensors header and GGUF field edits, extra / missing / special files) and
hands it to the loaders (``verify``, ``load`` plus one forward pass, GGUF
``memory_report``). Cases run in a child process under a memory limit that the
parent supervises, so a signal, an abort or a hang is recorded, not fatal.

Outcomes: ``refused`` (ValueError or OSError), ``accepted_unchanged``,
``accepted_no_manifest`` (allowed: no manifest, nothing can tell a change),
``accepted_resealed`` (allowed: the mutation was followed by rewriting
``mlxqat.json``, as someone editing the model on purpose would; these cases
reach the code behind the hash check), ``refused_unchanged`` (a false refusal
of an input with the seed's content: reported, not a failure) and the failures
``accepted_changed_with_manifest``, ``unclean_exception``, ``crash``, ``hang``.
"Changed" means the names, types or bytes of the files (read through symlinks
to regular files) differ from the seed's.

    python tests/fuzz/fuzz_loader.py --cases 2000 --mix manifest=5,plain=3,gguf=2,reseal=0.3   # the CI test's run
    python tests/fuzz/fuzz_loader.py --cases 100000 --seconds 1800 \\
        --json benchmarks/results/fuzz_loader.json --md benchmarks/results/fuzz_loader.md
    python tests/fuzz/fuzz_loader.py --seed 0 --repro 137 --keep /tmp/case137   # one case, in-process
                                                        # (pass the run's --mix: a case depends on it)

Exit status 1 if any failure. On Linux run it with tools/with-blas.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fuzz_mutations import (  # noqa: E402  (the sibling module: this script's directory is on sys.path)
    CLEAN, DEFAULT_MIX, DIR_MUTATIONS, FAILURES, INPUT_KINDS, MANIFEST, OUTCOMES, TOKENS,
    Case, _short, build_seeds, code_fingerprint, fingerprint,
)
from fuzz_gguf import GGUF_MUTATIONS  # noqa: E402

def _choose(rng: random.Random, table: dict) -> str:
    names = list(table)
    return rng.choices(names, weights=[table[n][1] for n in names])[0]


def make_case(run_seed: int, index: int, seeds: list, mix: dict, work: Path) -> dict:
    """Copy a seed into ``work`` and mutate it; everything follows from (run_seed, index)."""
    rng = random.Random(f"{run_seed}:{index}")
    kind = rng.choices(INPUT_KINDS, weights=[mix[k] for k in INPUT_KINDS])[0]
    seed = rng.choice([s for s in seeds if s["kind"] == kind])
    src = Path(seed["path"])
    work.mkdir(parents=True)
    root = work / src.name
    if kind == "gguf":
        shutil.copyfile(src, root)
    else:
        shutil.copytree(src, root, symlinks=True)
    c = Case(rng, root, seed, work)
    table = GGUF_MUTATIONS if kind == "gguf" else DIR_MUTATIONS
    n = 1 if rng.random() < 0.85 else rng.choice([2, 3])
    names, descs = [], []
    for _ in range(n):
        name = _choose(rng, table)
        try:
            descs.append(table[name][0](c))
        except Exception as e:  # noqa: BLE001 - e.g. an earlier mutation of this case broke the file
            descs.append(f"{name}: not applicable ({type(e).__name__})")
        names.append(name)
    resealed = kind == "manifest" and rng.random() < mix.get("reseal", 0.0)
    if resealed:
        names.append("reseal")
        descs.append(reseal(root))
        resealed = not descs[-1].startswith("reseal failed")
    changed = fingerprint(root) != seed["fingerprint"]
    has_manifest = kind == "manifest" and os.path.lexists(root / MANIFEST)
    return dict(i=index, input=seed["name"], kind=kind, mutation="+".join(names), desc="; ".join(descs),
                changed=changed, manifest=has_manifest, resealed=resealed, path=str(root))


def reseal(root: Path) -> str:
    """Rewrite mlxqat.json for the mutated files (keeping its other entries, edited or not), as
    someone who changed the files on purpose would: reaches the code behind the manifest check."""
    try:
        from mlxqat.storage.destinations import write_manifest
        from mlxqat.storage.manifest import Manifest

        doc = {}
        with contextlib.suppress(OSError, ValueError):
            if stat.S_ISREG(os.stat(root / MANIFEST).st_mode):  # never open a FIFO or /dev/zero
                doc = json.loads((root / MANIFEST).read_text())
        write_manifest(root, Manifest.info_of(doc))
        return "reseal mlxqat.json"
    except Exception as e:  # noqa: BLE001 - the mutated directory cannot get a manifest
        return f"reseal failed ({type(e).__name__}: {str(e)[:80]})"


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def t_verify(path: Path):
    import mlxqat

    mlxqat.verify(path)


def t_load_forward(path: Path):
    import mlx.core as mx

    import mlxqat

    model, _ = mlxqat.load(path)
    mx.eval(model(mx.array(TOKENS)))


def t_memory_report(path: Path):
    from mlxqat.footprint import memory_report

    memory_report(path)


# name -> (input kinds, function, decides acceptance). A case is accepted when every deciding
# target succeeds; all targets run (a refusal by one does not spare the next from the input).
# verify does not decide: a no-manifest directory always fails it.
TARGETS = {
    "verify": (("manifest", "plain"), t_verify, False),
    "load+forward": (("manifest", "plain"), t_load_forward, True),
    "memory_report": (("gguf",), t_memory_report, True),
    "gguf_load+forward": (("gguf",), t_load_forward, True),  # once mlxqat.load opens a .gguf (probed)
    "dir_memory_report": (("manifest", "plain"), t_memory_report, False),  # lazy mlx_lm load, no manifest check
}
DEFAULT_TARGETS = "verify,load+forward,memory_report,gguf_load+forward"


def select_targets(names: str, seeds: list) -> list:
    """[(name, kinds, fn, decides)] for ``--targets``; the GGUF load only if load accepts the seed GGUFs."""
    out = []
    for name in names.split(","):
        if name not in TARGETS:
            raise SystemExit(f"--targets: {name!r} is not one of {sorted(TARGETS)}")
        if name == "gguf_load+forward" and not gguf_load_supported(seeds):
            continue
        out.append((name, *TARGETS[name]))
    return out


def gguf_load_supported(seeds: list) -> bool:
    """Whether mlxqat.load opens the unmutated seed GGUF files (and the model runs)."""
    try:
        for s in seeds:
            if s["kind"] == "gguf":
                t_load_forward(Path(s["path"]))
        return True
    except Exception:  # noqa: BLE001 - not supported (yet)
        return False


def run_targets(case: dict, targets: list, on_stage=lambda name: None) -> dict:
    """Run the targets that apply to ``case``; classify the outcome."""
    path, kind = Path(case["path"]), case["kind"]
    stages, accepted = {}, None
    for name, kinds, fn, decides in targets:
        if kind not in kinds:
            continue
        on_stage(name)
        try:
            fn(path)
            stages[name] = "ok"
            ok = True
        except CLEAN as e:
            stages[name] = "refused"
            ok = False
            if decides or "refusal" not in case:  # keep the refusal that decided the outcome
                case["refusal"] = f"{name}: {type(e).__name__}: {str(e)[:300]}"
        except BaseException as e:  # noqa: BLE001 - everything else is the finding
            if isinstance(e, KeyboardInterrupt):
                raise
            stages[name] = "unclean"
            case.update(outcome="unclean_exception", stage=name, exc_type=_exc_name(e), exc=str(e)[:500],
                        where=_where(e))
            return case
        if decides:
            accepted = ok if accepted is None else (accepted and ok)
    case["stages"] = stages
    if not accepted:
        case["outcome"] = "refused" if case["changed"] else "refused_unchanged"
    elif not case["changed"]:
        case["outcome"] = "accepted_unchanged"
    elif case.get("resealed"):
        case["outcome"] = "accepted_resealed"
    elif case["manifest"]:
        case["outcome"] = "accepted_changed_with_manifest"
    else:
        case["outcome"] = "accepted_no_manifest"
    return case


def _exc_name(e: BaseException) -> str:
    t = type(e)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _where(e: BaseException) -> str:
    """The innermost frames of the traceback and the innermost mlxqat frame, to group findings."""
    tb = traceback.extract_tb(e.__traceback__)
    frames = tb[-2:]
    ours = [f for f in tb if f"{os.sep}mlxqat{os.sep}" in f.filename]
    if ours and ours[-1] not in frames:
        frames = [ours[-1]] + frames
    return " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                      for f in reversed(frames))


# ---------------------------------------------------------------------------
# Child: runs cases, one line per event on the report pipe
# ---------------------------------------------------------------------------


def child_main(args) -> int:
    limit = args.memory_gb << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import warnings

    warnings.simplefilter("ignore")
    import mlx.core as mx  # noqa: F401 - import under the limit, before the first case

    import mlxqat.export  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = os.fdopen(args.report_fd, "w", buffering=1)
    seeds = json.loads(Path(args.seeds_dir, "seeds.json").read_text())["seeds"]
    targets = select_targets(args.targets, seeds)
    out.write("R " + json.dumps({"targets": [t[0] + ":" + ",".join(t[1]) for t in targets]}) + "\n")
    mix = parse_mix(args.mix)
    work = Path(args.work)
    inject = {int(i): what for what, _, i in (x.partition(":") for x in args.inject.split(",") if x)}
    for i in range(args.start, args.cases):
        if time.time() > args.deadline:
            break
        out.write(f"S {i}\n")
        t0 = time.perf_counter()
        case = make_case(args.seed, i, seeds, mix, work / f"c{i}")
        out.write("M " + json.dumps({k: case[k] for k in ("i", "input", "kind", "mutation", "desc")}) + "\n")
        faults = [("inject", INPUT_KINDS, lambda _, what=inject[i]: _inject(what), False)] if i in inject else []
        run_targets(case, faults + targets, lambda name: out.write(f"T {i} {name}\n"))
        case["t"] = round(time.perf_counter() - t0, 4)
        case.pop("path")
        out.write("D " + json.dumps(case) + "\n")
        shutil.rmtree(work / f"c{i}", ignore_errors=True)
    out.write("E\n")
    out.close()
    return 0


def _inject(what: str) -> None:
    """Faults for checking the harness itself (--inject crash:I,hang:I,abort:I,exit:I,memory:I,unclean:I)."""
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "abort":
        os.abort()
    elif what == "exit":
        os._exit(3)
    elif what == "hang":
        time.sleep(3600)
    elif what == "memory":
        bytearray(64 << 30)  # over RLIMIT_AS: MemoryError, not the machine's memory
    elif what == "unclean":
        raise KeyError("injected")
    else:
        raise SystemExit(f"--inject: unknown fault {what!r}")


def parse_mix(text: str) -> dict:
    mix = {k: 0.0 for k in INPUT_KINDS + ("reseal",)}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in mix:
            raise SystemExit(f"--mix: {k!r} is not one of {INPUT_KINDS + ('reseal',)}")
        mix[k.strip()] = float(v)
    return mix


# ---------------------------------------------------------------------------
# Parent: supervises children, restarts them after a crash or hang
# ---------------------------------------------------------------------------


def _tail(path: Path, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def supervise(args, seeds_dir: Path, work: Path, deadline: float) -> tuple:
    """Run cases [0, args.cases) in children; returns (results, info)."""
    results, info = [], dict(children=0, targets=None, startup_s=[])
    start = 0
    while start < args.cases and time.time() < deadline:
        r, w = os.pipe()
        err_path = work / f"child{info['children']}.stderr"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--report-fd", str(w), "--seed", str(args.seed),
               "--start", str(start), "--cases", str(args.cases), "--deadline", repr(deadline),
               "--seeds-dir", str(seeds_dir), "--work", str(work), "--mix", args.mix,
               "--memory-gb", str(args.memory_gb), "--inject", args.inject, "--targets", args.targets]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                               os.environ.get("PYTHONPATH", "")]))
        with open(err_path, "wb") as err:
            child = subprocess.Popen(cmd, pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=err, env=env,
                                     start_new_session=True)
        os.close(w)
        try:
            start = _watch(child, r, err_path, start, args, results, info)
        finally:  # also on KeyboardInterrupt: no orphaned child stuck on a FIFO
            if child.poll() is None:  # not yet reaped, so its process group id is still ours
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            os.close(r)
    if args.progress:
        print(file=sys.stderr)
    return results, info


def _watch(child, r: int, err_path: Path, start: int, args, results: list, info: dict) -> int:
    """Read one child's events until it ends, crashes or hangs; returns the next case to run.

    Events, one line each: ``R`` ready, ``S i`` case i starts, ``M {...}`` its mutation,
    ``T i target`` a target starts, ``D {...}`` case done, ``E`` all done.
    """
    info["children"] += 1
    t_spawn = timer = time.time()
    buf, current, stage, meta, ended, ready = b"", None, "startup", {}, False, False
    while True:
        limit = args.case_timeout if ready else args.startup_timeout
        wait = timer + limit - time.time()
        if wait <= 0 or not select.select([r], [], [], wait)[0]:  # hang: no event for too long
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            idx = current if current is not None else start
            results.append(dict(meta.get(idx, {"i": idx}), outcome="hang", stage=stage,
                                exc=f"no progress in {limit:g} s", stderr=_tail(err_path)))
            return idx + 1 if ready else args.cases
        chunk = os.read(r, 1 << 16)
        if not chunk:  # EOF: the child exited
            code = child.wait()
            if ended and code == 0:
                return args.cases
            idx = current if current is not None else start
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            results.append(dict(meta.get(idx, {"i": idx}), outcome="crash", stage=stage, exc=how,
                                stderr=_tail(err_path)))
            return idx + 1 if ready else args.cases  # a child that cannot start is not retried
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            tag, _, rest = line.decode().partition(" ")
            timer = time.time()
            if tag == "R":
                ready, stage = True, None
                info["targets"] = json.loads(rest)["targets"]
                info["startup_s"].append(round(time.time() - t_spawn, 2))
            elif tag == "S":
                current = start = int(rest)
                stage = "mutate"
            elif tag == "M":
                m = json.loads(rest)
                meta[m["i"]] = m
            elif tag == "T":
                stage = rest.split(" ", 1)[1]
            elif tag == "D":
                results.append(json.loads(rest))
                meta.pop(current, None)
                current, start, stage = None, results[-1]["i"] + 1, None
            elif tag == "E":
                ended = True
        if args.progress and lines and len(results) % 50 == 0 and lines[-1].startswith(b"D "):
            print(f"\r{len(results)} cases", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


FILE_NAME = re.compile(r"[\w./-]+\.(?:json|safetensors|gguf|jinja|model|py)\b")


def signature(r: dict) -> str:
    """Groups failures: an exception by its type and where it was raised; an accepted change by
    the mutation and the file it touched; a crash or hang by its signal, stage and mutation."""
    if r["outcome"] == "unclean_exception":
        return f"unclean | {r.get('stage')} | {r.get('exc_type')} | {r.get('where')}"
    touched = FILE_NAME.search(r.get("desc", ""))
    what = f"{r.get('mutation', '?').split('+')[0]} {touched.group(0) if touched else ''}"
    if r["outcome"] == "accepted_changed_with_manifest":
        return f"accepted_changed | {what}"
    return f"{r['outcome']} | {re.sub(r'[0-9]+', 'N', r.get('exc', ''))} | {r.get('stage')} | {what}"


def summarize(results: list, args, wall: float, seeds_s: float, info: dict) -> dict:
    by_outcome = collections.Counter(r["outcome"] for r in results)
    by_kind = collections.defaultdict(collections.Counter)
    by_mutation = collections.defaultdict(collections.Counter)
    seconds = collections.Counter()
    for r in results:
        kind = r.get("kind") or r.get("input", "?").split("/")[0]
        by_kind[kind][r["outcome"]] += 1
        by_mutation[r.get("mutation", "?")][r["outcome"]] += 1
        seconds[kind] += r.get("t", 0.0)  # hangs and crashes are not timed
    failures = [r for r in results if r["outcome"] in FAILURES]
    groups = collections.OrderedDict()
    for r in failures:
        g = groups.setdefault(signature(r), dict(count=0, example=r, mutations=collections.Counter()))
        g["count"] += 1
        g["mutations"][r.get("mutation", "?")] += 1
    for g in groups.values():
        g["example"] = dict(g["example"], repro=f"python tests/fuzz/fuzz_loader.py --seed {args.seed} "
                                               f"--mix {args.mix} --repro {g['example']['i']} --keep /tmp/fuzz-case")
        g["mutations"] = dict(g["mutations"])
    return dict(
        seed=args.seed, code=code_fingerprint(), cases_requested=args.cases, cases_run=len(results),
        wall_s=round(wall, 1),
        seeds_s=round(seeds_s, 1), cases_per_s=round(len(results) / max(wall - seeds_s, 1e-9), 2),
        children=info["children"], child_startup_s=info["startup_s"], targets=info["targets"], mix=args.mix,
        case_timeout_s=args.case_timeout, memory_limit_gb=args.memory_gb,
        outcomes={k: by_outcome.get(k, 0) for k in OUTCOMES},
        by_input={k: dict(cases=sum(v.values()), in_child_s=round(seconds[k], 2),
                          cases_per_s=round(sum(v.values()) / seconds[k], 1) if seconds[k] else None, **dict(v))
                  for k, v in sorted(by_kind.items())},
        by_mutation={k: dict(v) for k, v in sorted(by_mutation.items())},
        n_failures=len(failures), failure_groups=list(groups.values()), failures=failures[:300],
        refused_unchanged=[r for r in results if r["outcome"] == "refused_unchanged"][:20],
    )


def markdown(s: dict) -> str:
    cols = ["cases"] + list(OUTCOMES)
    lines = [f"Loader fuzz run: seed {s['seed']}, {s['cases_run']} cases in {s['wall_s']} s "
             f"({s['cases_per_s']} cases/s after {s['seeds_s']} s building seeds), {s['children']} child "
             f"process(es), limit {s['memory_limit_gb']} GB, {s['case_timeout_s']} s per case.", "",
             "| input | cases/s (in child) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for k, v in s["by_input"].items():
        lines.append(f"| {k} | {v['cases_per_s']} | " + " | ".join(str(v.get(c, 0)) for c in cols) + " |")
    lines += ["", "| mutation | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, v in s["by_mutation"].items():
        lines.append(f"| {k} | {sum(v.values())} | " + " | ".join(str(v.get(c, 0)) for c in cols[1:]) + " |")
    if s["failure_groups"]:
        lines += ["", f"{s['n_failures']} failure(s) in {len(s['failure_groups'])} group(s):", ""]
        for g in s["failure_groups"]:
            e = g["example"]
            lines.append(f"- **{e['outcome']}** x{g['count']} ({e.get('stage')}): `{e.get('exc_type', '')}` "
                         f"{_short(e.get('exc', ''), 200)} -- e.g. case {e['i']} {e.get('input', '')}: "
                         f"{_short(e.get('desc', ''), 200)}; repro `{e['repro']}`")
    return "\n".join(lines) + "\n"


def repro(args, seeds: list) -> int:
    """Rebuild case ``args.repro`` in ``--keep`` (or a temp dir) and run it here, tracebacks shown."""
    import warnings

    warnings.simplefilter("ignore")
    work = Path(args.keep or tempfile.mkdtemp(prefix="fuzz-repro-"))
    if work.exists():
        shutil.rmtree(work)
    case = make_case(args.seed, args.repro, seeds, parse_mix(args.mix), work)
    print(json.dumps({k: case[k] for k in ("i", "input", "mutation", "desc", "changed", "manifest", "path")},
                     indent=1))
    targets = select_targets(args.targets, seeds)
    for name, kinds, fn, _ in targets:
        if case["kind"] in kinds:
            print(f"--- {name}", flush=True)
            try:
                fn(Path(case["path"]))
                print("ok")
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
    print(f"case kept in {work}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2000, help="number of cases (indices 0..N-1)")
    p.add_argument("--seconds", type=float, default=0, help="time budget for the whole run (0: none)")
    p.add_argument("--seed", type=int, default=0, help="run seed; case i depends only on (seed, i, --mix)")
    p.add_argument("--json", type=Path, help="write the summary here")
    p.add_argument("--md", type=Path, help="write a Markdown summary here")
    p.add_argument("--case-timeout", type=float, default=10.0, help="seconds without progress that count as a hang")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds a child may take to start")
    p.add_argument("--memory-gb", type=int, default=4, help="RLIMIT_AS of the child process")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"weights of the input kinds (default {DEFAULT_MIX})")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated, from {sorted(TARGETS)} (default {DEFAULT_TARGETS})")
    p.add_argument("--seeds-dir", type=Path, help="build (or reuse) the seed inputs here instead of a temp dir")
    p.add_argument("--repro", type=int, help="rebuild one case and run it in this process")
    p.add_argument("--keep", type=Path, help="with --repro: put the case here")
    p.add_argument("--progress", action="store_true", help="count cases on stderr")
    # internal: the child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--inject", default="", help=argparse.SUPPRESS)  # harness self-test: faults by case index
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)

    t0 = time.time()
    deadline = t0 + args.seconds if args.seconds > 0 else float("inf")
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-loader-"))
    try:
        seeds_dir = args.seeds_dir or tmp / "seeds"
        seeds_dir.mkdir(parents=True, exist_ok=True)
        seeds = build_seeds(seeds_dir)
        if args.repro is not None:
            if args.seeds_dir is None:
                print(f"seeds built in {seeds_dir} (kept: the case may link to them)")
            return repro(args, seeds)
        seeds_s = time.time() - t0
        work = tmp / "work"
        work.mkdir()
        results, info = supervise(args, seeds_dir, work, deadline)
    finally:
        if args.repro is None or args.seeds_dir is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    s = summarize(results, args, time.time() - t0, seeds_s, info)
    print(markdown(s))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(s, indent=1, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(s))
    return 1 if s["n_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
