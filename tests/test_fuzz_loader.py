"""Loader fuzzing in CI: 2,000 mutated model directories and GGUF files, only clean refusals.

Runs ``tests/fuzz/fuzz_loader.py`` as a subprocess (its cases run in a child
process under a 4 GB address-space limit and a 10 s per-step timeout, so a
signal or a hang is counted, not fatal to pytest). Half the cases are
directories with a manifest (most of their mutations are refused by hashing,
~100 cases/s on 2 cores; 30% of them get their manifest rewritten after the
mutation, which reaches the code behind the hash check), 30% directories
without one (loaded, ~45 cases/s) and 20% GGUF files (~40 cases/s): 2,000 cases
take about 35 s here, well inside the 2-minute budget.

Acceptance (issue 11): 0 crashes, 0 hangs, 0 unclean exceptions and 0 changes
to a directory with a manifest that load() accepts. A second test checks the
harness itself: injected faults are observed as crashes and hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fuzz" / "fuzz_loader.py"
CASES = 2000
BUDGET_S = 120  # the whole test, seeds and child start-up included
MIX = "manifest=5,plain=3,gguf=2,reseal=0.3"


def _fuzz(tmp_path: Path, *args: str, timeout: float) -> tuple:
    out = tmp_path / "fuzz.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)
    assert out.exists(), f"the fuzzer wrote no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def _failures(summary: dict) -> str:
    lines = []
    for g in summary["failure_groups"][:15]:
        e = g["example"]
        lines.append(f"  {e['outcome']} x{g['count']} [{e.get('stage')}] {e.get('exc_type', '')} "
                     f"{e.get('exc', '')[:200]!r}\n    case {e['i']} {e.get('input', '')}: {e.get('desc', '')[:300]}"
                     f"\n    repro: {e['repro']}")
    return "\n".join(lines)


def test_loader_fuzz_2000_cases_only_clean_refusals(tmp_path):
    t0 = time.time()
    proc, s = _fuzz(tmp_path, "--cases", str(CASES), "--seconds", str(BUDGET_S - 15), "--mix", MIX,
                    "--case-timeout", "10", "--memory-gb", "4", timeout=BUDGET_S + 30)
    elapsed = time.time() - t0
    outcomes = s["outcomes"]
    failed = {k: outcomes[k] for k in ("crash", "hang", "unclean_exception", "accepted_changed_with_manifest")}
    assert not any(failed.values()), f"{failed} in {s['cases_run']} cases:\n{_failures(s)}"
    assert s["cases_run"] >= CASES, f"only {s['cases_run']} of {CASES} cases ran in {s['wall_s']} s"
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every input kind was exercised, and unchanged inputs still load
    assert all(s["by_input"].get(k, {}).get("cases", 0) >= 100 for k in ("manifest", "plain", "gguf")), s["by_input"]
    assert outcomes["accepted_unchanged"] > 0 and outcomes["refused"] > CASES // 2, outcomes
    assert elapsed < BUDGET_S, f"the fuzz test took {elapsed:.0f} s (budget {BUDGET_S} s)"


def test_fuzz_harness_observes_crashes_hangs_and_memory_errors(tmp_path):
    """Faults injected into the child (by case index) come back as failures, and the run goes on."""
    proc, s = _fuzz(tmp_path, "--cases", "8", "--mix", "manifest=1", "--case-timeout", "3",
                    "--inject", "crash:1,hang:2,abort:3,exit:4,memory:5,unclean:6", timeout=120)
    by_case = {r["i"]: r for r in s["failures"]}
    assert proc.returncode == 1
    assert sorted(by_case) == [1, 2, 3, 4, 5, 6], by_case  # cases 0 and 7 are ordinary
    assert by_case[1]["outcome"] == "crash" and by_case[1]["exc"] == "signal SIGSEGV"
    assert by_case[2]["outcome"] == "hang" and by_case[2]["stage"] == "inject"
    assert by_case[3]["outcome"] == "crash" and by_case[3]["exc"] == "signal SIGABRT"
    assert by_case[4]["outcome"] == "crash" and by_case[4]["exc"] == "exit status 3"
    assert by_case[5]["outcome"] == "unclean_exception" and by_case[5]["exc_type"] == "MemoryError"
    assert by_case[6]["outcome"] == "unclean_exception" and by_case[6]["exc_type"] == "KeyError"
    assert s["cases_run"] == 8 and s["children"] == 5  # a new child after each crash and the hang
