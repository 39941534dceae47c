"""The Markdown tables of ``experiments/README.md``, computed from the committed CSVs.

    python experiments/make_tables.py              # print every table
    python experiments/make_tables.py --check      # exit 1 if README.md's tables differ
    python experiments/make_tables.py --write      # replace README.md's tables in place

Each table sits in README.md between ``<!-- table:NAME -->`` and ``<!-- /table -->``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exp_common import RESULTS, group_mean_std, read_csv  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"


def _pm(row: dict, key: str, digits: int = 3) -> str:
    v = row.get(key, math.nan)
    s = row.get(key + "_std", math.nan)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    if isinstance(s, (int, float)) and math.isfinite(s) and row.get("n_seeds", 1) > 1:
        return f"{v:.{digits}f} ± {s:.{digits}f}"
    return f"{v:.{digits}f}"


def _num(v, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}f}" if math.isfinite(f) else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def semicircle(results: Path) -> str:
    rows = read_csv(results / "semicircle_convergence.csv")
    metrics = [
        "ks_pooled",
        "kl_binned",
        "ks_per_matrix",
        "frac_outside",
        "max_abs_eig",
        "spqr_kl_paper",
        "spqr_kl_corrected",
    ]
    agg = group_mean_std(rows, ["case", "d"], metrics)
    out = []
    for case in ("goe_classic", "goe", "iid"):
        for d in (2, 3, 4, 5, 6, 10, 20, 50):
            r = next((a for a in agg if a["case"] == case and a["d"] == d), None)
            if r is None:
                continue
            out.append(
                [case, str(d), str(d * (d + 1) // 2)]
                + [_pm(r, m, 3 if m != "frac_outside" else 4) for m in metrics]
            )
    return _table(
        [
            "case",
            "d",
            "N",
            "KS pooled",
            "binned KL",
            "KS one matrix",
            "frac. abs(x) >= 2",
            "max abs(eig)",
            "SPQR KL paper",
            "SPQR KL corrected",
        ],
        out,
    )


def outlier(results: Path) -> str:
    rows = read_csv(results / "semicircle_outlier.csv")
    agg = group_mean_std(
        rows, ["kind", "N", "theta", "density"], ["spqr_kl", "accept", "frac_outside"]
    )
    out = []
    for kind in ("outlier_diag", "outlier_offdiag", "rank_one"):
        for n in (10, 15, 21):
            for theta in (0.0, 2.0, 4.0, 8.0):
                get = {
                    dens: next(
                        (
                            a
                            for a in agg
                            if a["kind"] == kind
                            and a["N"] == n
                            and a["theta"] == theta
                            and a["density"] == dens
                        ),
                        None,
                    )
                    for dens in ("paper", "corrected")
                }
                if get["paper"] is None:
                    continue
                p, c = get["paper"], get["corrected"]
                out.append(
                    [
                        kind,
                        str(n),
                        f"{theta:g}",
                        _pm(p, "spqr_kl"),
                        _pm(c, "spqr_kl"),
                        _pm(p, "frac_outside"),
                        _pm(p, "accept"),
                    ]
                )
    return _table(
        ["planted", "N", "theta", "KL paper", "KL corrected", "frac. abs(eig) >= 2", "acceptance"],
        out,
    )


TOY_COLS = [
    ("bias_min", "bias of min"),
    ("rmse_mean", "RMSE of mean"),
    ("spread", "spread"),
    ("err_corr", "error corr."),
    ("resid_corr", "resid. corr."),
    ("mp_ratio", "MP ratio"),
    ("spqr_kl", "SPQR KL"),
    ("spike", "spike"),
    ("accept", "accept."),
]
EVAL = {"bandit": "uniform", "chain": "grid"}


def beta(results: Path) -> str:
    rows = read_csv(results / "beta_sweep.csv")
    out = []
    for problem, ev in (("bandit", "uniform"), ("bandit", "data"), ("chain", "grid")):
        prs = [r for r in rows if r["problem"] == problem]
        keys = [f"{ev}_{m}" for m, _ in TOY_COLS] + ["greedy_regret", "grad_ratio"]
        for r in sorted(group_mean_std(prs, ["beta"], keys), key=lambda r: r["beta"]):
            out.append([problem, ev, f"{r['beta']:g}"] + [_pm(r, k) for k in keys])
    return _table(
        ["problem", "pairs", "beta"]
        + [c for _, c in TOY_COLS]
        + ["greedy regret", "grad ratio KL/TD"],
        out,
    )


def size(results: Path) -> str:
    rows = read_csv(results / "ensemble_size.csv")
    out = []
    cols = [
        ("bias_min", "bias of min"),
        ("spread", "spread"),
        ("err_corr", "error corr."),
        ("spike", "spike"),
        ("accept", "accept."),
    ]
    for problem in ("bandit", "chain"):
        ev = EVAL[problem]
        prs = [r for r in rows if r["problem"] == problem]
        keys = [f"{ev}_{m}" for m, _ in cols] + ["greedy_regret"]
        agg = group_mean_std(prs, ["N", "beta", "density"], keys)
        for r in sorted(agg, key=lambda r: (r["N"], r["beta"], r["density"])):
            arm = "SAC-N" if r["beta"] == 0 else f"SPQR {r['beta']:g} ({r['density']})"
            out.append([problem, str(r["N"]), arm] + [_pm(r, k) for k in keys])
    return _table(["problem", "N", "arm"] + [c for _, c in cols] + ["greedy regret"], out)


def hopper(results: Path) -> str:
    rows = read_csv(results / "ensemble_size_hopper.csv")
    out = []
    for r in sorted(rows, key=lambda r: (r["N"], r["beta"])):
        arm = "SAC-N" if r["beta"] == 0 else f"SPQR {r['beta']:g} ({r['density']})"
        out.append(
            [
                str(r["N"]),
                arm,
                str(r["seed"]),
                f"{_num(r['final_return'], 1)} ({_num(r['final_normalized_score'], 2)})",
                _num(r["mid_return"], 1),
                _num(r["final_q_mean"], 2),
                _num(r["spqr_kl_2nd_half"]),
                _num(r["spqr_spike_2nd_half"]),
                _num(r["spqr_accept_rate_2nd_half"]),
                _num(r["spqr_mp_ratio_2nd_half"]),
                _num(r["spqr_mean_pairwise_corr_2nd_half"]),
                _num(r["spqr_ensemble_std_2nd_half"]),
                _num(r["updates_per_s_2nd_half"], 2),
            ]
        )
    return _table(
        [
            "N",
            "arm",
            "seed",
            "final return (norm.)",
            "mid return",
            "final Q mean",
            "SPQR KL",
            "spike",
            "accept.",
            "MP ratio",
            "resid. corr.",
            "ens. std",
            "updates/s",
        ],
        out,
    )


def synthetic(results: Path) -> str:
    rows = read_csv(results / "spectral_vs_direct_synthetic.csv")
    ms = ["err_corr", "resid_corr", "mp_ratio", "spqr_kl", "spike", "accept"]
    agg = group_mean_std(rows, ["kind", "N", "strength"], ms)
    out = []
    for n in sorted({r["N"] for r in agg}):
        for kind in ("common", "clusters", "pair", "outlier"):
            for c in (0.0, 0.5, 0.9):
                r = next(
                    (a for a in agg if a["kind"] == kind and a["N"] == n and a["strength"] == c),
                    None,
                )
                if r is not None:
                    out.append([str(n), kind, f"{c:g}"] + [_pm(r, m) for m in ms])
    return _table(
        [
            "N",
            "dependence",
            "c",
            "error corr.",
            "resid. corr.",
            "MP ratio",
            "SPQR KL",
            "spike",
            "accept.",
        ],
        out,
    )


def runs_corr(results: Path) -> str:
    rows = read_csv(results / "spectral_vs_direct_runs.csv")
    pairs = [k for k in rows[0] if k.startswith("rho_")]
    names = [
        k[4:]
        .replace("__", " vs ")
        .replace("spqr_kl", "KL")
        .replace("resid_corr", "resid")
        .replace("err_corr", "err")
        .replace("mp_ratio", "MP")
        for k in pairs
    ]
    out = [
        [r["source"], str(r["N"]), str(r["points"])] + [_num(r[k], 2) for k in pairs] for r in rows
    ]
    return _table(["source", "N", "points"] + names, out)


TABLES: dict[str, Callable[[Path], str]] = {
    "semicircle": semicircle,
    "outlier": outlier,
    "beta": beta,
    "size": size,
    "hopper": hopper,
    "synthetic": synthetic,
    "runs_corr": runs_corr,
}
# a block: the opening marker on its own line, anything (or nothing), the closing marker
_BLOCK = re.compile(r"^<!-- table:(\w+) -->\n(.*?)^<!-- /table -->$", re.S | re.M)


def render_readme(text: str, results: Path = RESULTS) -> str:
    def block(m: re.Match) -> str:
        return f"<!-- table:{m.group(1)} -->\n{TABLES[m.group(1)](results)}\n<!-- /table -->"

    return _BLOCK.sub(block, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true")
    g.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    if args.check or args.write:
        text = README.read_text()
        new = render_readme(text, args.results)
        if args.write:
            README.write_text(new)
            return 0
        if new != text:
            print("README.md tables differ from the CSVs: run make_tables.py --write")
            return 1
        return 0
    for name, fn in TABLES.items():
        try:
            print(f"<!-- table:{name} -->\n{fn(args.results)}\n<!-- /table -->\n")
        except FileNotFoundError as err:
            print(f"{name}: missing {err.filename}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
