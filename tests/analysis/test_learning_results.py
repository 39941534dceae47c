"""The README's learning table and ``benchmarks/learning/effects.md`` come from the committed runs.

Every number in the README's "Learning, with and without SPQR" table is recomputed
here from the run folders under ``benchmarks/learning/`` (``metrics.csv`` of each
run) and must match to the digits shown; so must the committed effects table.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from torchrl_spqr import analysis  # noqa: E402
from torchrl_spqr.analysis.runs import series  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LEARNING = ROOT / "benchmarks" / "learning"


def _sentence(pattern: str, text: str, flags: int = 0) -> re.Match | None:
    """``re.search`` with every literal space of ``pattern`` matching any run of whitespace,
    so that a README sentence matches wherever its lines wrap."""
    return re.search(re.sub(r"(?:\\s\+| )+", r"\\s+", pattern), text, flags)


def _population_effects():
    """``benchmarks/learning/population_effects.py`` (not a package: loaded from its file)."""
    import importlib.util

    path = LEARNING / "population_effects.py"
    spec = importlib.util.spec_from_file_location("population_effects", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _population_folders(label: str) -> tuple[str, ...]:
    """The folders whose runs a pooled population setting reads: one list, kept in
    ``population_effects.SETTINGS`` (its ``label``), for the README row and the table."""
    (sources,) = [src for lab, _, src in _population_effects().SETTINGS if lab == label]
    return tuple(folder for folder, _ in sources)


# README setting, or (setting, budget) where a setting has rows at several budgets ->
# (run folder under benchmarks/learning, or a tuple of folders whose runs are pooled by arm,
# arm-name prefix, evaluation key)
SETTINGS = {
    "Hopper-v5, SAC-Ens (UTD 1)": ("hopper_sac_ens_20k", "", "eval_return"),
    "Walker2d-v5, SAC-Ens (UTD 1)": ("walker2d_sac_ens_20k", "", "eval_return"),
    "Hopper-v5, REDQ (M = 2, UTD 5)": ("hopper_redq_utd5_5k", "", "eval_return"),
    "Walker2d-v5, REDQ (M = 2, UTD 5)": ("walker2d_redq_utd5_5k", "", "eval_return"),
    "offline Hopper random (local), SAC-N": (
        "hopper_random_offline_4arm",
        "sac_n",
        "normalized_score",
    ),
    "offline Hopper random (local), EDAC": (
        "hopper_random_offline_4arm",
        "edac",
        "normalized_score",
    ),
    "offline Hopper medium-replay (local), SAC-N": (
        "hopper_medium_replay_offline_4arm",
        "sac_n",
        "normalized_score",
    ),
    "offline Hopper medium-replay (local), EDAC": (
        "hopper_medium_replay_offline_4arm",
        "edac",
        "normalized_score",
    ),
    "VMAS balance, MASAC (3 agents)": ("masac_balance", "", "eval_return"),
    "Hopper-v5, SAC-Ens population (UTD 1)": (
        "hopper_population_15k/next_policy",
        "",
        "eval_return",
    ),
    "Hopper-v5, SAC-Ens population, `next_policy` pairs (UTD 1)": (
        "hopper_population_50k/next_policy",
        "",
        "eval_return",
    ),
    "Hopper-v5, SAC-Ens population, `data` pairs (UTD 1)": (
        "hopper_population_50k/data",
        "",
        "eval_return",
    ),
    "Hopper-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)": (
        ("hopper_bf16_kernel_30k/arms", "hopper_bf16_kernel_30k_seeds3to5/arms"),
        "",
        "eval_return",
    ),
    "Hopper-v5, SAC-Ens population, fp32 products, `data` pairs (UTD 1)": (
        "hopper_fp32_25k_seeds6to8/arms",
        "",
        "eval_return",
    ),
    ("Hopper-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)", "100k steps"): (
        "hopper_bf16_100k/arms",
        "",
        "eval_return",
    ),
    ("Hopper-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)", "200k steps"): (
        "hopper_bf16_long/arms",
        "",
        "eval_return",
    ),
    ("Hopper-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)", "75k steps"): (
        _population_folders("Hopper-v5, bf16, data pairs, 75k"),
        "",
        "eval_return",
        75_000,
    ),
    "Walker2d-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)": (
        "walker2d_bf16_75k/arms",
        "",
        "eval_return",
        75_000,
    ),
    "HalfCheetah-v5, SAC-Ens population, bf16 products, `data` pairs (UTD 1)": (
        _population_folders("HalfCheetah-v5, bf16, data pairs, 60k"),
        "",
        "eval_return",
        60_000,
    ),
}

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _readme_rows() -> list[list[str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| setting | budget | seeds |"))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _matches(cell: str, expected: list[float]) -> None:
    """The numbers of ``cell`` equal ``expected`` rounded to the decimals each is shown with."""
    shown = _NUM.findall(cell)
    assert len(shown) == len(expected), (cell, expected)
    for s, e in zip(shown, expected):
        decimals = len(s.split(".")[1]) if "." in s else 0
        assert float(s) == pytest.approx(round(e, decimals), abs=0.51 * 10**-decimals), (cell, e)


def _arms(folder: str | tuple[str, ...], prefix: str) -> dict[int, list[Path]]:
    """``{0: baseline runs, 1: SPQR runs}`` of the one beta-1 comparison whose arms start so
    (over several folders: each folder's comparison, their runs pooled)."""
    if isinstance(folder, tuple):
        parts = [_arms(f, prefix) for f in folder]
        return {b: [run for part in parts for run in part[b]] for b in (0, 1)}
    groups = analysis.group_runs([LEARNING / folder])
    pairs = [p for p in analysis.effect_pairs(groups) if p[2].startswith(prefix)]
    assert [p[1] for p in pairs] == [1.0], (folder, prefix, sorted(groups))
    _, _, base, spqr = pairs[0]
    return {0: groups[base], 1: groups[spqr]}


def _setting(row: list[str]) -> tuple[str | tuple[str, ...], str, str, int | None]:
    """The run folder(s), arm prefix, key and budget read (``until``; ``None``: the whole
    runs) of a README row (by setting and budget first)."""
    found = SETTINGS.get((row[0], row[1])) or SETTINGS[row[0]]
    return (*found, None) if len(found) == 3 else found


def test_every_readme_row_is_known():
    rows = _readme_rows()
    unknown = [r[:2] for r in rows if (r[0], r[1]) not in SETTINGS and r[0] not in SETTINGS]
    assert rows and not unknown, unknown


@pytest.mark.parametrize("row", _readme_rows(), ids=lambda r: f"{r[0]}, {r[1]}")
def test_readme_learning_row_matches_the_runs(row):
    _setting_name, _budget, seeds, final, best, accept = row
    folder, prefix, key, until = _setting(row)
    arms = _arms(folder, prefix)
    summ = {
        b: analysis.summary_rows({"arm": runs}, key, until=until)[0] for b, runs in arms.items()
    }
    diag = {b: analysis.diagnostics_rows({"arm": runs}, until=until)[0] for b, runs in arms.items()}
    if until is not None:  # every run read up to the row's budget has its evaluation there
        assert all(s == until for r in summ.values() for s in r["steps"]), summ
    run_seeds = {b: sorted(analysis.seed_of(r) for r in runs) for b, runs in arms.items()}
    assert run_seeds[0] == run_seeds[1] == [int(s) for s in _NUM.findall(seeds)]
    for cell, name in ((final, "final"), (best, "best")):
        with_sd = len(_NUM.findall(cell)) == 4
        expected = []
        for b in (0, 1):
            expected.append(summ[b][f"{name}_mean"])
            if with_sd:
                expected.append(summ[b][f"{name}_sd"])
        _matches(cell, expected)
    _matches(accept, [diag[b]["spqr_accept_rate_mean"] for b in (0, 1)])


def test_committed_effects_table_matches_the_runs():
    path = LEARNING / "effects.md"
    text = path.read_text()
    # written by the command line under its new name or its old one (torchrl_spqr.plot)
    cmd = _sentence(r"Written by `python -m torchrl_spqr\.(?:analysis|plot) ([^`]+)`", text)
    assert cmd, "effects.md records the command that wrote it"
    args = cmd.group(1).split()
    folders = [ROOT / a for a in args[: next(i for i, a in enumerate(args) if a.startswith("--"))]]
    assert "--key" not in args  # the table below is of eval_return
    eff = analysis.paired_effects(analysis.group_runs(folders))
    assert analysis.effects_table(eff) in text


def test_bf16_comparison_in_the_readme_matches_the_runs():
    """The README's bfloat16-against-float32 paragraph, from ``hopper_bf16_50k``."""
    groups = analysis.group_runs([LEARNING / "hopper_bf16_50k"])
    arms = {}
    for name, runs in groups.items():
        arms[name.split("/")[0]] = runs
    assert sorted(arms) == ["bf16", "fp32"]
    summ = {a: analysis.summary_rows({"arm": runs}, "eval_return")[0] for a, runs in arms.items()}
    by_seed = {a: dict(zip(map(analysis.seed_of, arms[a]), summ[a]["final"])) for a in arms}
    assert sorted(by_seed["bf16"]) == sorted(by_seed["fp32"]) == [0, 1, 2]
    diffs = [by_seed["bf16"][s] - by_seed["fp32"][s] for s in (0, 1, 2)]
    text = (ROOT / "README.md").read_text()
    para = text.split("bfloat16 critic products (`network.matmul_dtype=bfloat16`", 1)[1]
    para = para.split("\n\n", 1)[0]
    m = _sentence(
        r"Final return (\S+) \+- (\S+) \(bfloat16\) against (\S+) \+- (\S+) \(float32\)", para
    )
    assert m, para
    _matches(
        " ".join(m.groups()),
        [
            summ["bf16"]["final_mean"],
            summ["bf16"]["final_sd"],
            summ["fp32"]["final_mean"],
            summ["fp32"]["final_sd"],
        ],
    )
    shown = _sentence(r"bfloat16 minus float32 is \+?(-?[\d.]+)", para)
    _matches(shown.group(1), [sum(diffs) / 3])


def test_bf16_kernel_check_in_the_readmes_matches_the_runs():
    """The 30k learning check of the faster bfloat16 kernel: the figures in the README and
    in its folder's README are those ``compare_at_30k.py`` computes from the committed runs."""
    import importlib.util

    path = LEARNING / "hopper_bf16_kernel_30k" / "compare_at_30k.py"
    spec = importlib.util.spec_from_file_location("compare_at_30k", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = {
        name: [mod.read(Path(str(p).format(s=s))) for s in range(3)] for name, p in mod.ARMS.items()
    }

    def final(name):
        return [r[0] for r in res[name]]

    def mean_sd(values):
        return [statistics.mean(values), statistics.stdev(values)]

    beta0, beta1 = "bf16, this kernel, beta 0", "bf16, this kernel, beta 1 (data pairs)"
    diff_old = [a - b for a, b in zip(final(beta0), final("bf16, section 10's kernel, beta 0"))]
    diff_fp32 = [a - b for a, b in zip(final(beta0), final("float32, beta 0"))]
    para = (ROOT / "README.md").read_text().split("With the faster bfloat16 kernel", 1)[1]
    para = para.split("\n\n", 1)[0]
    m = _sentence(r"final return (\S+) \+- (\S+) at\s+beta 0 and (\S+) \+- (\S+) at beta 1", para)
    assert m, para
    _matches(" ".join(m.groups()), mean_sd(final(beta0)) + mean_sd(final(beta1)))
    m = _sentence(r"previous one \(beta 0, at 30k\) is (\S+) .*?minus float32\s+(\S+) ", para, re.S)
    assert m, para
    _matches(" ".join(m.groups()), [sum(diff_old) / 3, sum(diff_fp32) / 3])
    folder = (LEARNING / "hopper_bf16_kernel_30k" / "README.md").read_text()
    for name, label in [
        (beta0, "bfloat16, this kernel, beta 0 |"),
        (beta1, "bfloat16, this kernel, beta 1 (data pairs) |"),
    ]:
        row = folder.split(label, 1)[1].split("\n", 1)[0]
        best = [r[1] for r in res[name]]
        _matches(row, mean_sd(final(name)) + mean_sd(best) + final(name))


def test_pooled_bf16_check_in_the_readmes_matches_the_runs():
    """Seeds 3-5 of the bfloat16 kernel's 30k check and seeds 0-5 pooled: the figures in
    its README, the learning README and the README are those ``pooled_at_30k.py``
    computes from the committed runs."""
    import importlib.util

    folder = LEARNING / "hopper_bf16_kernel_30k_seeds3to5"
    spec = importlib.util.spec_from_file_location("pooled_at_30k", folder / "pooled_at_30k.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.results()
    b0, b1 = res["beta 0"], res["beta 1 (data pairs)"]
    text = (folder / "README.md").read_text()
    seed_sets = {"3-5": range(3, 6), "0-5": range(6)}
    for arm, runs in res.items():
        for label, seeds in seed_sets.items():
            final = [runs[s][0] for s in seeds]
            best = [runs[s][1] for s in seeds]
            row = text.split(f"\n| {arm} | {label} |", 1)[1].split("\n", 1)[0]
            stats = [statistics.mean(final), statistics.stdev(final)]
            _matches(row, stats + [statistics.mean(best), statistics.stdev(best)] + final)
    effect = {}
    for label, seeds in seed_sets.items():
        d = [b1[s][0] - b0[s][0] for s in seeds]
        effect[label] = [float(x[0]) for x in analysis.mean_ci(d)]
        row = text.split(f"\n| {label} | ", 1)[1].split("\n", 1)[0]
        _matches(row, d + effect[label])
    readme = (ROOT / "README.md").read_text()
    hit = _sentence(r"over seeds 0-5: (\S+), 95% t interval (\S+) to (\S+)\s", readme)
    assert hit, "README: the pooled effect sentence"
    _matches(" ".join(hit.groups()), effect["0-5"])
    learning = (LEARNING / "README.md").read_text()
    hit = _sentence(
        r"seeds 0-5, paired by seed: (\S+), 95% t interval\s+(\S+) to (\S+)\s", learning
    )
    assert hit, "benchmarks/learning/README.md: the pooled effect sentence"
    _matches(" ".join(hit.groups()), effect["0-5"])


def _budgets_folder(
    folder: Path, capsys, seeds=range(3)
) -> tuple[object, dict[str, list[Path]], dict]:
    """Run ``folder/budgets.py`` and check that it prints ``budgets.txt``, and that every
    row ``| <budget>k | ...`` of ``folder/README.md`` holds the runs' final and best
    (mean, sd per arm) and SPQR's paired effect on the final at that budget, read with
    ``until``. Returns the script's module, its groups of runs and the effects by budget."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"budgets_{folder.name}", folder / "budgets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main()
    assert capsys.readouterr().out == (folder / "budgets.txt").read_text()
    groups = {g: [folder / "arms" / f"{g}_seed{s}" for s in seeds] for g in mod.ARMS}
    text = (folder / "README.md").read_text()
    effects = {}
    for step in mod.BUDGETS:
        rows = {r["group"]: r for r in analysis.summary_rows(groups, until=step)}
        b0, b1 = rows["beta0.0_N10"], rows["beta1.0_N10"]
        diffs = [w - b for w, b in zip(b1["final"], b0["final"])]
        effects[step] = [float(x[0]) for x in analysis.mean_ci(diffs)]
        assert f"\n| {step // 1000}k | " in text, f"{folder.name}/README.md: no {step // 1000}k row"
        row = text.split(f"\n| {step // 1000}k | ", 1)[1].split("\n", 1)[0]
        expected = []
        for name in ("final", "best"):
            for r in (b0, b1):
                expected += [r[f"{name}_mean"], r[f"{name}_sd"]]
        _matches(row, expected + effects[step])
    return mod, groups, effects


def test_100k_run_in_the_readmes_matches_the_runs(capsys):
    """The 100k run read at four budgets: ``budgets.txt`` is what ``budgets.py`` prints from
    the committed runs, and the figures of its README, the learning README and the README
    are those of the runs read with ``until``."""
    folder = LEARNING / "hopper_bf16_100k"
    mod, groups, effects = _budgets_folder(folder, capsys)
    text = (folder / "README.md").read_text()
    pooled = {
        g: runs + [mod.SEEDS_3_TO_5 / f"{g}_seed{s}" for s in range(3, 6)]
        for g, runs in groups.items()
    }
    rows = {r["group"]: r for r in analysis.summary_rows(pooled, until=30_000)}
    d = [w - b for w, b in zip(rows["beta1.0_N10"]["final"], rows["beta0.0_N10"]["final"])]
    pooled_30k = [float(x[0]) for x in analysis.mean_ci(d)]
    hit = _sentence(r"six seeds give (\S+), 95% t interval \[(\S+), (\S+)\]", text)
    assert hit, "hopper_bf16_100k/README.md: the pooled 30k sentence"
    _matches(" ".join(hit.groups()), pooled_30k)
    readme = (ROOT / "README.md").read_text()
    final_100k = []
    for r in analysis.summary_rows(groups, until=100_000):
        final_100k += [r["final_mean"], r["final_sd"]]
    hit = _sentence(
        r"minutes on the 2 cores\): final return (\S+) \+- (\S+) at beta 0 and (\S+) \+- (\S+) at",
        readme,
    )
    assert hit, "README: the 100k final returns"
    _matches(" ".join(hit.groups()), final_100k)
    hit = _sentence(r"beta 1 minus beta 0 is (\S+), 95% t interval (\S+) to (\S+)\s", readme)
    assert hit, "README: the 100k effect sentence"
    _matches(" ".join(hit.groups()), effects[100_000])
    hit = _sentence(
        r"pooled\s+with seeds 3-5, the same runs give (\S+), 95% t interval (\S+) to", readme
    )
    assert hit, "README: the pooled 30k sentence"
    _matches(" ".join(hit.groups()), pooled_30k[:2])
    learning = (LEARNING / "README.md").read_text()
    hit = _sentence(r"paired by seed (\S+), 95% t interval (\S+) to (\S+)\. One seed", learning)
    assert hit, "benchmarks/learning/README.md: the 100k effect sentence"
    _matches(" ".join(hit.groups()), effects[100_000])


def test_200k_run_in_the_readmes_matches_the_runs(capsys):
    """The 100k run continued to 200k: ``budgets.txt`` is what ``budgets.py`` prints (which
    checks that the rows up to 100k are the 100k run's), every run ends at 200k, and the
    figures of its README, the learning README and the README are those of the runs."""
    folder = LEARNING / "hopper_bf16_long"
    mod, groups, effects = _budgets_folder(folder, capsys)
    assert mod.BUDGETS[-1] == mod.END == 200_000
    for runs in groups.values():
        for run in runs:
            assert analysis.read_metrics(run)[-1]["frames"] == mod.END, run
    rows = {r["group"]: r for r in analysis.summary_rows(groups)}
    b0, b1 = rows["beta0.0_N10"], rows["beta1.0_N10"]
    text = (folder / "README.md").read_text()
    for arm, r in (("beta 0", b0), ("beta 1", b1)):
        hit = _sentence(
            rf"(?:\(best\): |\n){arm}: (\S+) \((\S+)\), (\S+) \((\S+)\), (\S+) \((\S+)\)[;.]", text
        )
        assert hit, f"hopper_bf16_long/README.md: the per-seed line of {arm}"
        _matches(" ".join(hit.groups()), [v for pair in zip(r["final"], r["best"]) for v in pair])
    diffs = [w - b for w, b in zip(b1["final"], b0["final"])]
    hit = _sentence(r"\(at\s+200k: (\S+),\s+(\S+) and (\S+)\)\. Each seed pair", text)
    assert hit, "hopper_bf16_long/README.md: the per-seed differences at 200k"
    _matches(" ".join(hit.groups()), diffs)
    evaluations = 0  # beta 1 ahead for seeds 0 and 2, behind for seed 1, from 100k on
    for s, (base, spqr) in enumerate(zip(groups["beta0.0_N10"], groups["beta1.0_N10"])):
        (s0, v0), (s1, v1) = (series(analysis.read_metrics(r), "eval_return") for r in (base, spqr))
        assert s0 == s1
        ahead = {st: w > b for st, b, w in zip(s0, v0, v1) if st >= 100_000}
        assert set(ahead.values()) == {s != 1}, (s, ahead)
        evaluations = len(ahead)
    assert evaluations == 41
    for doc in (text, (ROOT / "README.md").read_text(), (LEARNING / "README.md").read_text()):
        assert _sentence(r"41\s+evaluations\s+from\s+100k\s+to\s+200k", doc)
    final = [b0["final_mean"], b0["final_sd"], b1["final_mean"], b1["final_sd"]]
    readme = (ROOT / "README.md").read_text()
    hit = _sentence(
        r"to \*\*200k steps\*\* \(two thirds of the paper's\s+budget\): final return (\S+) \+- "
        r"(\S+) at beta 0 and (\S+) \+- (\S+) at beta 1; paired by\s+seed, (\S+), 95% t "
        r"interval (\S+) to (\S+)\.",
        readme,
    )
    assert hit, "README: the 200k sentence"
    _matches(" ".join(hit.groups()), final + effects[200_000])
    learning = (LEARNING / "README.md").read_text()
    hit = _sentence(
        r"Final evaluation at 200k (\S+) \+- (\S+) \(beta 0\) and (\S+) \+- (\S+)\s+\(beta 1\); "
        r"paired by seed (\S+), 95% t interval (\S+) to (\S+)\.",
        learning,
    )
    assert hit, "benchmarks/learning/README.md: the 200k sentence"
    _matches(" ".join(hit.groups()), final + effects[200_000])


def test_fp32_seeds_6_to_8_in_the_readmes_matches_the_runs(capsys):
    """Seeds 6-8 (float32 products) at 25k, and seeds 0-8 pooled: ``pooled_at_25k.txt`` is
    what ``pooled_at_25k.py`` prints from the committed runs, and the pooled effect in the
    folder README, the learning README and the README is that of the runs read at 25k."""
    import importlib.util

    folder = LEARNING / "hopper_fp32_25k_seeds6to8"
    spec = importlib.util.spec_from_file_location("pooled_at_25k", folder / "pooled_at_25k.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main()
    assert capsys.readouterr().out == (folder / "pooled_at_25k.txt").read_text()
    effects = {}
    for name, sets in (("6-8", [(6, 7, 8)]), ("0-8", [(0, 1, 2), (3, 4, 5), (6, 7, 8)])):
        rows = {r["group"]: r for r in analysis.summary_rows(mod.groups(sets), until=mod.STEP)}
        assert all(r["steps"] == [mod.STEP] * len(r["final"]) for r in rows.values())
        d = [w - b for w, b in zip(rows["beta1.0_N10"]["final"], rows["beta0.0_N10"]["final"])]
        effects[name] = [float(x[0]) for x in analysis.mean_ci(d)]
    for path, label in (
        (folder / "README.md", "folder README"),
        (LEARNING / "README.md", "learning README"),
        (ROOT / "README.md", "README"),
    ):
        text = path.read_text()
        for name, eff in effects.items():
            hit = _sentence(
                rf"seeds {name}[^:]*?: (\S+),\s+95% t interval\s+(\S+)\s+to\s+(\S+)[\s.,;)]",
                text,
            )
            assert hit, f"{label}: the seeds {name} effect sentence"
            _matches(" ".join(hit.groups()), eff)


def _pooled_and_alone_in_the_readmes(
    folder: Path, capsys, seeds: tuple[int, ...], pooled_sets: list[tuple[int, ...]], pooled: str
) -> list[float]:
    """A later-seeds folder read at every budget of its ``budgets.py`` (``_budgets_folder``),
    then SPQR's effect at the last budget (the primary budget of the folder's plan), with
    ``pooled_sets`` pooled and with ``seeds`` alone, checked against the sentences naming
    them (``pooled``, and "seeds <a>-<b> alone") in the folder README, the learning README
    and the README. Returns the pooled runs' final returns of beta 0."""
    mod, _, effects = _budgets_folder(folder, capsys, seeds=seeds)
    primary = mod.BUDGETS[-1]
    rows = {r["group"]: r for r in analysis.summary_rows(mod.groups(pooled_sets), until=primary)}
    assert all(s == primary for r in rows.values() for s in r["steps"])
    d = [w - b for w, b in zip(rows["beta1.0_N10"]["final"], rows["beta0.0_N10"]["final"])]
    pooled_effect = [float(x[0]) for x in analysis.mean_ci(d)]
    alone = f"seeds {seeds[0]}-{seeds[-1]} alone"
    for path in (folder / "README.md", LEARNING / "README.md", ROOT / "README.md"):
        text = path.read_text()
        for name, eff in ((pooled, pooled_effect), (alone, effects[primary])):
            words = r"\s+".join(re.escape(w) for w in name.split())  # across line breaks
            hit = _sentence(
                rf"{words}[^:]*?:\s+(\S+),\s+95% t interval\s+(\S+)\s+to\s+(\S+)[\s.,;)]", text
            )
            assert hit, f"{path}: the {name} effect sentence"
            _matches(" ".join(hit.groups()), eff)
    return rows["beta0.0_N10"]["final"]


def test_seeds_9_to_11_in_the_readmes_match_the_runs(capsys):
    """Seeds 9-11 read at every budget up to the last one all runs reached (the primary
    budget of the folder's plan): ``budgets.txt`` is what ``budgets.py`` prints, the
    folder README's rows are the runs', and SPQR's effect at that budget, seeds 0-2 and
    9-11 pooled (the primary figure) and seeds 9-11 alone, is the runs' in the folder
    README, the learning README and the README."""
    _pooled_and_alone_in_the_readmes(
        LEARNING / "hopper_bf16_100k_seeds9to11",
        capsys,
        (9, 10, 11),
        [(0, 1, 2), (9, 10, 11)],
        "seeds 0-2 and 9-11",
    )


_SEEDS_AT_75K = [(0, 1, 2), (9, 10, 11), (12, 13, 14), (15, 16, 17), (18, 19, 20)]


@pytest.mark.parametrize(
    "folder,added,pooled",
    [
        ("hopper_bf16_75k_seeds12to14", 3, "seeds 0-2, 9-11 and 12-14"),
        ("hopper_bf16_75k_seeds15to17", 4, "seeds 0-2, 9-11, 12-14 and 15-17"),
        ("hopper_bf16_75k_seeds18to20", 5, "seeds 0-2 and 9-20"),
    ],
)
def test_later_seeds_at_75k_in_the_readmes_match_the_runs(capsys, folder, added, pooled):
    """A set of three seeds run to 75k, read at 30k, 50k and 75k: ``budgets.txt`` is what
    its ``budgets.py`` prints, the folder README's rows are the runs', and SPQR's effect at
    75k, every seed set up to this one pooled (the primary figure of the folder's plan:
    nine, twelve, fifteen seeds) and the set alone, is the runs' in the folder README, the
    learning README and the README."""
    sets = _SEEDS_AT_75K[:added]
    finals = _pooled_and_alone_in_the_readmes(LEARNING / folder, capsys, sets[-1], sets, pooled)
    assert len(finals) == 3 * added


@pytest.mark.parametrize(
    "folder, env",
    [("walker2d_bf16_75k", "Walker2d-v5"), ("halfcheetah_bf16_60k", "HalfCheetah-v5")],
)
def test_other_environments_in_the_readmes_match_the_runs(capsys, folder, env):
    """``env`` seeds 0-2 read at every budget of the folder's ``budgets.py``: ``budgets.txt``
    is what the script prints, the folder README's rows are the runs', and SPQR's effect on
    the final return at the last budget (the primary figure of the folder's plan) is the
    runs' in the folder README, the learning README and the README."""
    folder = LEARNING / folder
    mod, _, effects = _budgets_folder(folder, capsys)
    primary = mod.BUDGETS[-1]
    for path in (folder / "README.md", LEARNING / "README.md", ROOT / "README.md"):
        hit = _sentence(
            rf"{env},\s+seeds\s+0-2,\s+final\s+return\s+at\s+{primary // 1000}k[^:]*?:\s+(\S+),"
            r"\s+95% t interval\s+(\S+)\s+to\s+(\S+)[\s.,;)]",
            path.read_text(),
        )
        assert hit, f"{path}: the {env} effect sentence"
        _matches(" ".join(hit.groups()), effects[primary])


def test_halfcheetah_seeds_3_to_5_in_the_readmes_match_the_runs(capsys):
    """HalfCheetah seeds 3-5 read at 20k, 40k and 60k: ``budgets.txt`` is what its
    ``budgets.py`` prints, the folder README's rows are the runs', and SPQR's effect at 60k,
    seeds 0-5 pooled (the primary figure of the folder's plan) and seeds 3-5 alone, is the
    runs' in the folder README, the learning README and the README."""
    finals = _pooled_and_alone_in_the_readmes(
        LEARNING / "halfcheetah_bf16_60k_seeds3to5",
        capsys,
        (3, 4, 5),
        [(0, 1, 2), (3, 4, 5)],
        "HalfCheetah-v5, seeds 0-5",
    )
    assert len(finals) == 6


def test_halfcheetah_re_evaluation_in_the_readmes_matches_its_csv():
    """The twelve final checkpoints of HalfCheetah seeds 0-5 re-evaluated on 50 episodes
    (``--evaluate 50``; the checkpoints are not committed, every episode's return is, in
    ``evaluation.csv``): ``evaluation.md`` is the table of those returns, and SPQR's
    paired effect on them is the one the READMEs give."""
    from torchrl_spqr.analysis.evaluation import ReturnEstimate, return_effects, return_table

    folder = LEARNING / "halfcheetah_bf16_60k_seeds3to5" / "evaluation"
    with (folder / "evaluation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    estimates = []
    for r in rows:
        returns = [float(x) for x in r["returns"].split(";")]
        assert len(returns) == int(r["episodes"]) == 50 and int(r["frames"]) == 60_000
        assert float(r["mean_return"]) == pytest.approx(statistics.mean(returns))
        estimates.append(
            (
                r["arm"],
                ReturnEstimate(
                    r["run"], 60_000, 50, float(r["mean_return"]), float(r["std_return"]), returns
                ),
            )
        )
    assert sorted(analysis.seed_of(Path(e.run)) for _, e in estimates) == sorted(list(range(6)) * 2)
    assert (folder / "evaluation.md").read_text().endswith(return_table(estimates) + "\n")
    (effect,) = return_effects(estimates)
    assert effect["seeds"] == [0, 1, 2, 3, 4, 5]
    expected = [effect["diff_mean"], *effect["diff_ci"]]
    for path in (folder.parent / "README.md", LEARNING / "README.md", ROOT / "README.md"):
        hit = _sentence(
            r"re-evaluated\s+on\s+50\s+episodes[^:]*?:\s+(\S+),\s+95%\s+t\s+interval\s+(\S+)"
            r"\s+to\s+(\S+)[\s.,;)]",
            path.read_text(),
        )
        assert hit, f"{path}: the re-evaluation sentence"
        _matches(" ".join(hit.groups()), expected)


def test_committed_population_effects_table_matches_the_runs():
    """``effects_population.md``: every population setting at its budget, recomputed."""
    mod = _population_effects()
    rows = mod.setting_rows()
    assert (LEARNING / "effects_population.md").read_text() == mod.table(rows)
    # each row reads its runs at its own budget: the final is the evaluation at that step
    for (label, budget, sources), row in zip(mod.SETTINGS, rows):
        assert row["until"] == budget
        groups = mod.setting_groups(sources)
        summ = {r["group"]: r for r in analysis.summary_rows(groups, until=budget)}
        assert all(summ[g]["steps"] == [budget] * len(groups[g]) for g in mod.ARMS), label
        diffs = [w - b for w, b in zip(summ["beta1.0_N10"]["final"], summ["beta0.0_N10"]["final"])]
        assert row["final_diff_mean"] == pytest.approx(statistics.mean(diffs)), label


def test_every_population_folder_is_in_the_population_effects_or_says_why_not():
    mod = _population_effects()
    read = {f.split("/")[0] for _, _, sources in mod.SETTINGS for f, _ in sources}
    with_spqr_arm = {
        p.relative_to(LEARNING).parts[0] for p in LEARNING.glob("*/**/beta1.0_N10_seed*")
    }
    assert with_spqr_arm, "no population folder found"
    assert with_spqr_arm - read - set(mod.LEFT_OUT) == set()
    assert set(mod.LEFT_OUT) <= with_spqr_arm  # no stale entry
