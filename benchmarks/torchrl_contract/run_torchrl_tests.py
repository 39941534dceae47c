#!/usr/bin/env python
"""Run TorchRL's own loss tests on bare and on SPQR-wrapped losses; count the breakage.

TorchRL's tests are not part of this repository: extract them from a
pytorch/rl checkout matching the installed torchrl (see README.md), e.g.::

    python benchmarks/torchrl_contract/run_torchrl_tests.py \\
        --extract-from /path/to/rl/.git --rev v0.14.1 --rl-dir /tmp/rl_tests

then::

    python benchmarks/torchrl_contract/run_torchrl_tests.py --rl-dir /tmp/rl_tests --name after

For every selected test class (default ``TestSAC``, ``TestREDQ``, ``TestTD3``,
``TestCQL``; the file holding each is found automatically) pytest runs once per
mode:

- ``bare``: the tests as TorchRL wrote them;
- ``wrapped``: with ``-p spqr_wrap_plugin``: every ``SACLoss``/``REDQLoss``/
  ``TD3Loss``/``CQLLoss`` the tests build becomes
  ``SPQRLoss(<loss with max(3, n) critics>, beta=0)`` (CQL through an N-critic
  CQL class, skipped when that class is missing);
- ``n3`` (with ``--control``): the critics raised to ``max(3, n)`` but no
  wrapper, to tell failures caused by the larger ensemble from those caused by
  the wrapper.

Only tests that pass bare are compared. The table, the grouped failure
messages and the ids of the tests that pass bare but fail wrapped are written
to ``results/<name>.txt`` (and ``results/<name>.json``); the junit XML files and
pytest logs go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_CLASSES = ("TestSAC", "TestREDQ", "TestTD3", "TestCQL")
PLUGIN = "spqr_wrap_plugin"
MODE_ENV = {"wrapped": "wrap", "n3": "n3"}
# files test/objectives/*.py import besides the installed torchrl
EXTRACT_PATHS = ("pytest.ini", "test/conftest.py", "test/objectives")


# --------------------------------------------------------------------------- setup
def extract(git_dir: str, rev: str, rl_dir: Path) -> None:
    rl_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.check_output(
        ["git", f"--git-dir={git_dir}", "rev-parse", f"{rev}^{{commit}}"], text=True
    ).strip()
    archive = subprocess.Popen(
        ["git", f"--git-dir={git_dir}", "archive", commit, *EXTRACT_PATHS], stdout=subprocess.PIPE
    )
    subprocess.check_call(["tar", "-x", "-C", str(rl_dir)], stdin=archive.stdout)
    if archive.wait() != 0:
        raise SystemExit("git archive failed")
    subject = subprocess.check_output(
        ["git", f"--git-dir={git_dir}", "log", "-1", "--format=%ci %s", commit], text=True
    ).strip()
    label = commit + (f" ({rev})" if rev != commit else "") + f" [{subject}]"
    (rl_dir / "RL_COMMIT").write_text(label + "\n")
    print(f"extracted {', '.join(EXTRACT_PATHS)} of pytorch/rl {rev} ({commit}) into {rl_dir}")


def find_class_file(rl_dir: Path, cls: str) -> str:
    pat = re.compile(rf"^class {re.escape(cls)}\b", re.M)
    hits = [
        p
        for p in sorted((rl_dir / "test" / "objectives").glob("test_*.py"))
        if pat.search(p.read_text())
    ]
    if not hits:
        raise SystemExit(f"class {cls} not found under {rl_dir}/test/objectives")
    return str(hits[0].relative_to(rl_dir))


# --------------------------------------------------------------------------- running
def run_pytest(rl_dir: Path, target: str, mode: str, junit: Path, log: Path, args) -> float:
    env = dict(os.environ)
    paths = [p for p in (args.pythonpath, str(HERE), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        target,
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not gpu",
        f"--junitxml={junit}",
    ]
    if mode != "bare":
        env["SPQR_WRAP_MODE"] = MODE_ENV[mode]
        cmd += ["-p", PLUGIN]
    else:
        env.pop("SPQR_WRAP_MODE", None)
    if args.xdist:
        cmd += ["-n", str(args.xdist)]
    cmd += args.pytest_args
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(
            "$ " + " ".join(shlex.quote(c) for c in cmd) + f"\n# PYTHONPATH={env['PYTHONPATH']}\n"
        )
        fh.flush()
        subprocess.run(cmd, cwd=rl_dir, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(f"\n# wall {wall:.1f} s\n")
    return wall


# --------------------------------------------------------------------------- parsing
def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """nodeid -> (outcome, message); outcome in passed/failed/error/skipped."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    out: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return out
    for tc in ET.parse(path).getroot().iter("testcase"):
        parts = tc.get("classname", "").split(".")
        if len(parts) >= 2 and parts[-1].startswith("Test"):
            nodeid = "/".join(parts[:-1]) + ".py::" + parts[-1] + "::" + tc.get("name", "")
        else:
            nodeid = "/".join(parts) + ".py::" + tc.get("name", "")
        outcome, msg = "passed", ""
        for child in tc:
            tag = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if tag and rank[tag] > rank[outcome]:
                outcome = tag
                text_lines = (child.text or "").strip().splitlines()
                msg = child.get("message") or (text_lines[-1] if text_lines else "")
                if msg.startswith("Failed: DID NOT WARN"):
                    # an exception raised inside ``pytest.warns`` is reported as
                    # "DID NOT WARN" with the real exception chained: surface it
                    root = [
                        ln
                        for ln in text_lines
                        if _EXC_LINE.match(ln) and not ln.startswith("Failed:")
                    ]
                    if root:
                        msg = root[0] + "  [raised inside pytest.warns]"
        prev = out.get(nodeid)
        if prev is None or rank[outcome] > rank[prev[0]]:
            out[nodeid] = (outcome, msg)
    return out


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")

_NORMALISERS = [
    (
        re.compile(r"^(\w+: )\S+ is not an accepted tensordict key.*"),
        r"\1<key> is not an accepted tensordict key (set_keys)",
    ),
    (re.compile(r"(Accepted keys are:).*"), r"\1 …"),
    (re.compile(r"(which has )\[[^\]]*\]?.*"), r"\1[…]"),
    (re.compile(r"0x[0-9a-fA-F]+"), "0x…"),
    (re.compile(r"tensor\((?:[^()]|\([^()]*\))*\)", re.S), "tensor(…)"),
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "N"),
    (re.compile(r"\s+"), " "),
]


def category(msg: str) -> str:
    first = msg.strip().split("\n")[0]
    for pat, rep in _NORMALISERS:
        first = pat.sub(rep, first)
    return first[:160] if first else "(no message)"


# --------------------------------------------------------------------------- report
def build_report(name, rl_dir, classes, files, modes, results, walls, args) -> tuple[str, dict]:
    import torch
    import torchrl

    try:
        spqr_file = subprocess.check_output(
            [sys.executable, "-c", "import torchrl_spqr; print(torchrl_spqr.__file__)"],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    p for p in (args.pythonpath, os.environ.get("PYTHONPATH")) if p
                ),
            },
            text=True,
            cwd="/",
        ).strip()
    except subprocess.CalledProcessError:
        spqr_file = "?"
    spqr_root = Path(spqr_file).parent.parent
    try:
        spqr_rev = subprocess.check_output(
            ["git", "-C", str(spqr_root), "rev-parse", "--short", "HEAD"],
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
        dirty = subprocess.check_output(
            ["git", "-C", str(spqr_root), "status", "--porcelain", "--", "torchrl_spqr"], text=True
        ).strip()
        spqr_rev += " (+ uncommitted changes in torchrl_spqr/)" if dirty else " (clean)"
    except Exception:
        spqr_rev = "?"
    rl_commit = (
        (rl_dir / "RL_COMMIT").read_text().strip() if (rl_dir / "RL_COMMIT").exists() else "unknown"
    )

    lines = [
        f"# torchrl contract run '{name}' — {dt.datetime.now().isoformat(timespec='seconds')}",
        f"torchrl {torchrl.__version__}, torch {torch.__version__}; tests from pytorch/rl {rl_commit}",
        f"torchrl_spqr: {spqr_file} at {spqr_rev}",
        f"modes: {', '.join(modes)}; wrapped = SPQRLoss(loss with max(3, n) critics, beta=0)",
        "",
    ]
    hdr = ["class", "collected", "pass bare"]
    if "n3" in modes:
        hdr += ["fail n3", "pass bare&n3", "fail wrapped", "fail wrapped (of bare&n3)"]
    else:
        hdr += ["fail wrapped"]
    hdr += ["skip wrapped", "pass wrapped"]
    rows = []
    summary: dict = {
        "name": name,
        "rl_commit": rl_commit,
        "torchrl": torchrl.__version__,
        "torchrl_spqr": spqr_file,
        "torchrl_spqr_rev": spqr_rev,
        "classes": {},
        "walls_s": walls,
    }
    all_fail: list[tuple[str, str]] = []
    tot = collections.Counter()
    for cls in classes:
        bare = {k: v for k, v in results["bare"][cls].items()}
        passed = sorted(k for k, v in bare.items() if v[0] == "passed")
        wr = results.get("wrapped", {}).get(cls, {})
        n3 = results.get("n3", {}).get(cls, {})
        missing = [k for k in passed if k not in wr]
        fail_w = [k for k in passed if wr.get(k, ("missing",))[0] in ("failed", "error", "missing")]
        skip_w = [k for k in passed if wr.get(k, ("",))[0] == "skipped"]
        pass_w = [k for k in passed if wr.get(k, ("",))[0] == "passed"]
        row = [cls, len(bare), len(passed)]
        entry = {
            "collected": len(bare),
            "pass_bare": len(passed),
            "fail_wrapped": len(fail_w),
            "skip_wrapped": len(skip_w),
            "pass_wrapped": len(pass_w),
            "missing_wrapped": len(missing),
            "bare_outcomes": dict(collections.Counter(v[0] for v in bare.values())),
        }
        if "n3" in modes:
            fail_n3 = [
                k for k in passed if n3.get(k, ("missing",))[0] in ("failed", "error", "missing")
            ]
            only_w = [k for k in fail_w if n3.get(k, ("",))[0] == "passed"]
            pass_n3 = (
                len(passed) - len(fail_n3) - sum(n3.get(k, ("",))[0] == "skipped" for k in passed)
            )
            row += [len(fail_n3), pass_n3, len(fail_w), len(only_w)]
            entry.update(
                fail_n3=len(fail_n3),
                pass_bare_and_n3=pass_n3,
                fail_wrapped_of_bare_and_n3=len(only_w),
            )
            tot.update(
                {
                    "fail n3": len(fail_n3),
                    "pass bare&n3": pass_n3,
                    "fail wrapped (of bare&n3)": len(only_w),
                }
            )
        else:
            row += [len(fail_w)]
        row += [len(skip_w), len(pass_w)]
        rows.append(row)
        tot.update(
            {
                "collected": len(bare),
                "pass bare": len(passed),
                "fail wrapped": len(fail_w),
                "skip wrapped": len(skip_w),
                "pass wrapped": len(pass_w),
            }
        )
        entry["failing_wrapped"] = {
            k: category(wr.get(k, ("missing", "not run"))[1]) for k in fail_w
        }
        if "n3" in modes:
            entry["failing_n3"] = {
                k: category(n3.get(k, ("missing", "not run"))[1]) for k in fail_n3
            }
        summary["classes"][cls] = entry
        all_fail += [
            (
                k,
                wr.get(k, ("missing", "not run / crashed"))[1],
                cls,
                "n3" in modes and n3.get(k, ("",))[0] != "passed",
            )
            for k in fail_w
        ]
    rows.append(["TOTAL"] + [tot[h] for h in hdr[1:]])
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]

    def fmt(r):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )

    lines += [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[:-1]]
    lines += [fmt(["-" * w for w in widths]), fmt(rows[-1]), ""]
    lines.append(
        f"{tot['fail wrapped']} of the {tot['pass bare']} tests that pass on the bare losses fail on the wrapped ones"
        + (f" ({tot['skip wrapped']} skipped wrapped)." if tot["skip wrapped"] else ".")
    )
    if "n3" in modes:
        lines.append(
            f"{tot['fail wrapped (of bare&n3)']} of the {tot['pass bare&n3']} tests that pass on the bare losses AND "
            "with the critics raised to >=3 (unwrapped, n3 control) fail on the wrapped ones."
        )
    lines.append("")
    lines.append("files: " + ", ".join(f"{c} -> {files[c]}" for c in classes))
    lines.append(
        "wall time (s): "
        + ", ".join(
            f"{m}/{c}: {walls.get(f'{m}/{c}', float('nan')):.0f}" for m in modes for c in classes
        )
    )
    lines.append("")
    cats = collections.Counter(category(m) for _, m, _, _ in all_fail)
    example, per_cls, n3_too = (
        {},
        collections.defaultdict(collections.Counter),
        collections.Counter(),
    )
    for k, m, cls, n3_fail in all_fail:
        example.setdefault(category(m), k)
        per_cls[category(m)][cls.removeprefix("Test")] += 1
        n3_too[category(m)] += bool(n3_fail)
    lines.append(
        f"## wrapped failures grouped by message ({len(cats)} groups; first failure of each test only)"
    )
    for c, n in cats.most_common():
        split = ", ".join(f"{k} {v}" for k, v in per_cls[c].most_common())
        if "n3" in modes:
            split += f"; {n3_too[c]} of them fail in n3 too"
        lines.append(f"{n:5d}  {c}\n       [{split}] e.g. {example[c]}")
    lines.append("")
    if "n3" in modes:
        n3cats = collections.Counter(
            v for cls in classes for v in summary["classes"][cls]["failing_n3"].values()
        )
        lines.append("## n3-control failures (critics raised to 3, no wrapper) grouped by message")
        for c, n in n3cats.most_common():
            lines.append(f"{n:5d}  {c}")
        lines.append("")
    lines.append(
        "## test ids passing bare and failing wrapped"
        + (" ('[n3]': fails in the n3 control too)" if "n3" in modes else "")
    )
    for k, _, _, n3_fail in all_fail:
        lines.append(k + ("  [n3]" if n3_fail else ""))
    summary["categories"] = cats.most_common()
    return "\n".join(lines) + "\n", summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rl-dir", required=True, type=Path, help="dir holding the extracted pytest.ini and test/"
    )
    ap.add_argument(
        "--extract-from", metavar="GIT_DIR", help="pytorch/rl git dir to extract the tests from"
    )
    ap.add_argument(
        "--rev", default="v0.14.1", help="revision for --extract-from (default v0.14.1)"
    )
    ap.add_argument("--extract-only", action="store_true")
    ap.add_argument("--name", default="run", help="results/<name>.txt (default 'run')")
    ap.add_argument("--classes", default=",".join(DEFAULT_CLASSES))
    ap.add_argument("--control", action="store_true", help="also run the n3 control mode")
    ap.add_argument("--modes", help="comma list among bare,n3,wrapped (overrides --control)")
    ap.add_argument(
        "--pythonpath",
        help="put this first on PYTHONPATH (e.g. a worktree of an older torchrl_spqr)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="pytest processes run at once")
    ap.add_argument(
        "--xdist", type=int, default=0, help="pytest-xdist workers per process (needs pytest-xdist)"
    )
    ap.add_argument(
        "--work-dir", type=Path, help="junit/log dir (default /tmp/torchrl_contract/<name>)"
    )
    ap.add_argument(
        "--reuse", action="store_true", help="re-parse existing junit files, run nothing"
    )
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    rl_dir = args.rl_dir.resolve()
    if args.extract_from:
        extract(args.extract_from, args.rev, rl_dir)
        if args.extract_only:
            return 0
    if args.xdist and importlib.util.find_spec("xdist") is None:
        print("pytest-xdist not installed: --xdist ignored", file=sys.stderr)
        args.xdist = 0
    modes = (
        args.modes.split(",")
        if args.modes
        else (["bare", "n3", "wrapped"] if args.control else ["bare", "wrapped"])
    )
    if "bare" not in modes:
        modes.insert(0, "bare")
    classes = [c for c in args.classes.split(",") if c]
    files = {c: find_class_file(rl_dir, c) for c in classes}
    work = (args.work_dir or Path("/tmp/torchrl_contract") / args.name).resolve()
    work.mkdir(parents=True, exist_ok=True)

    jobs = [(m, c) for m in modes for c in classes]
    walls: dict[str, float] = {}
    if not args.reuse:

        def one(mc):
            m, c = mc
            w = run_pytest(
                rl_dir, f"{files[c]}::{c}", m, work / f"{m}_{c}.xml", work / f"{m}_{c}.log", args
            )
            print(f"  {m:8s} {c:10s} {w:7.1f} s", flush=True)
            return mc, w

        print(
            f"running {len(jobs)} pytest processes ({args.jobs} at a time); logs in {work}",
            flush=True,
        )
        with cf.ThreadPoolExecutor(max(1, args.jobs)) as ex:
            for (m, c), w in ex.map(one, jobs):
                walls[f"{m}/{c}"] = round(w, 1)
        (work / "walls.json").write_text(json.dumps(walls))
    elif (work / "walls.json").exists():
        walls = json.loads((work / "walls.json").read_text())

    results = {m: {c: parse_junit(work / f"{m}_{c}.xml") for c in classes} for m in modes}
    text, summary = build_report(args.name, rl_dir, classes, files, modes, results, walls, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.txt").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    head = text.split("## test ids")[0]
    print(head)
    print(f"written {RESULTS / (args.name + '.txt')} and {args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
