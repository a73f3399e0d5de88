"""What a transfer experiment's fine-tunes say: per-initialisation rows, paired comparisons, the oracle gap and
how much of it each predictor closes, plain-language verdicts, and the markdown table. Torch-free: the report
reads finished runs with it, and a test imports it without torch.

Results are dicts {init, pretrain_seed, seed, acc_head, acc_full}; ``descs`` maps an initialisation to its
description {method, step, multiplier, …}. Pairs are (pre-training seed, downstream seed).
"""

from __future__ import annotations

import math

import numpy as np

from evaluation import stats

EXPERIMENT = "oblivion-transfer"
ROLE_TAG = "oblivion.role"
PHASES = ("head", "full")
SCRATCH = {"method": "scratch", "step": 0, "multiplier": 0}


def _by_init(results: list[dict]) -> tuple[dict, list, list]:
    by: dict = {}
    for r in results:
        by.setdefault(r["init"], {})[(r["pretrain_seed"], r["seed"])] = r
    pairs = sorted(by["naive"])
    return by, pairs, [p[0] for p in pairs]


def references(init: str, desc: dict, have) -> list[str]:
    """What a KNOW initialisation is compared with at its step: naive, TaskVector, and each control matched
    to it (shrink-and-perturb and pure shrink fitted to its update, the fixed 0.8^k shrink, naive with BN at
    its initial values as the released scripts' predictions have it)."""
    m, k = desc["method"], desc["step"]
    refs = ["naive", f"taskvector-{k}", f"sp-{m}-{k}", f"shrink-{m}-{k}", f"scaled-{k}", "naive-bninit"]
    return [r for r in refs if r in have]


def summarize(results: list[dict], descs: dict, source_acc: dict) -> tuple[list[dict], list[dict]]:
    """Per-initialisation rows and paired comparisons of every KNOW initialisation to its references.

    Two corrections keep the evidence honest: ``p_holm`` is Holm-adjusted over the comparisons of one method
    (our KNOWN's family is not diluted or inflated by the authors' KNOWN; a dozen tests give a p < 0.05 by
    chance often), and with several pre-training seeds ``p_pretrain`` tests with the pre-training seed as the
    unit (downstream seeds under one pre-trained model are not independent draws of a pre-trained model, so
    the pooled p is optimistic), Holm-adjusted the same way as ``p_pretrain_holm``."""
    by, pairs, clusters = _by_init(results)
    order = [i for i in ["scratch", *descs] if i in by]
    several = len(set(clusters)) > 1

    def vals(init, phase):
        return [by[init][p][f"acc_{phase}"] for p in pairs]

    def compare(init, ref, phase) -> dict:
        a, b = vals(init, phase), vals(ref, phase)
        p = stats.paired(a, b)
        out = {"d": p.mean, "ci_low": p.ci_low, "ci_high": p.ci_high, "p": p.p, "n": p.n, "wins": p.wins}
        if several:
            out["p_pretrain"] = stats.clustered(a, b, clusters).p
        return out

    rows = []
    for init in order:
        desc = descs.get(init, SCRATCH)
        row = {"init": init, "method": desc["method"], "step": desc["step"], "multiplier": desc["multiplier"],
               "n": len(pairs), "source_acc": source_acc.get(init, float("nan"))}
        for phase in PHASES:
            row[f"{phase}_mean"], row[f"{phase}_std"] = stats.mean_std(vals(init, phase))
            if init != "naive":
                c = compare(init, "naive", phase)
                row.update({f"{phase}_d_naive": c["d"], f"{phase}_ci_low": c["ci_low"], f"{phase}_ci_high": c["ci_high"], f"{phase}_p": c["p"]})
                if several:
                    row[f"{phase}_p_pretrain"] = c["p_pretrain"]
        rows.append(row)
    comparisons = []
    for init in order:
        desc = descs.get(init, {})
        if not str(desc.get("method", "")).startswith("known"):
            continue
        for ref in references(init, desc, by):
            for phase in PHASES:
                comparisons.append({"init": init, "method": desc["method"], "reference": ref, "phase": phase,
                                    **compare(init, ref, phase)})
    holm_within_methods(comparisons, ("p", "p_pretrain") if several else ("p",))
    return rows, comparisons


def holm_within_methods(comparisons: list[dict], keys: tuple[str, ...]) -> None:
    """``<key>_holm`` on every comparison: each ``key`` Holm-adjusted within the comparisons of its method."""
    for method in {c["method"] for c in comparisons}:
        family = [c for c in comparisons if c["method"] == method]
        for key in keys:
            for c, adj in zip(family, stats.holm([c[key] for c in family])):
                c[f"{key}_holm"] = adj


def oracle_gaps(results: list[dict], descs: dict) -> list[dict]:
    """For every oracle (Θ0's recipe on ×m the data) and phase: the gap oracle − naive (paired, 95% CI) and,
    for each prediction that claims the same ×m, the fraction of that gap it closes (bootstrap CI)."""
    by, pairs, clusters = _by_init(results)
    out = []
    for name, desc in descs.items():
        if desc["method"] != "oracle" or name not in by:
            continue
        claims = [i for i, d in descs.items() if i in by and d["step"] > 0 and d["method"] != "oracle"
                  and math.isclose(d["multiplier"], desc["multiplier"], rel_tol=1e-3)]
        for phase in PHASES:
            acc = {i: [by[i][p][f"acc_{phase}"] for p in pairs] for i in [name, "naive", *claims]}
            gap = stats.paired(acc[name], acc["naive"])
            row = {"oracle": name, "multiplier": desc["multiplier"], "phase": phase, "gap": gap.mean,
                   "gap_ci_low": gap.ci_low, "gap_ci_high": gap.ci_high, "gap_p": gap.p, "n": gap.n, "closed": {}}
            if len(set(clusters)) > 1:
                row["gap_p_pretrain"] = stats.clustered(acc[name], acc["naive"], clusters).p
            for init in claims:
                f, lo, hi = stats.gap_closed(acc[init], acc["naive"], acc[name], clusters)
                row["closed"][init] = {"fraction": f, "ci_low": lo, "ci_high": hi}
            out.append(row)
    return out


def select_rates(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """A tuned experiment's answer: for each initialisation the full-phase learning-rate factor with the best
    mean *validation* accuracy over all its pairs (ties: the factor nearest 1), and its results with
    ``acc_full`` the test accuracy at that factor. Returns (selected results, one table row per init with
    the mean validation and test accuracy at every factor). The test set never takes part in the choice."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["init"], []).append(r)
    selected, table = [], []
    for init, rs in by.items():
        factors = sorted(rs[0]["val_lr"])
        val = {f: float(np.mean([r["val_lr"][f] for r in rs])) for f in factors}
        test = {f: float(np.mean([r["test_lr"][f] for r in rs])) for f in factors}
        best = max(factors, key=lambda f: (val[f], -abs(math.log(f))))
        table.append({"init": init, "val": val, "test": test, "selected": best, "n": len(rs)})
        selected += [{**r, "acc_full": r["test_lr"][best], "lr_factor": best} for r in rs]
    return selected, table


def tuning_markdown(table: list[dict]) -> list[str]:
    factors = sorted(table[0]["val"])
    lines = ["Learning-rate selection (full phase): mean validation / test accuracy at full_lr × each factor; "
             "the selected factor (best validation accuracy) is what every other table reports:", "",
             "| init | " + " | ".join(f"×{f:g} val / test" for f in factors) + " | selected |",
             "|---|" + "---|" * len(factors) + "---|"]
    for row in table:
        cells = [f"{'**' if f == row['selected'] else ''}{_pct(row['val'][f])} / {_pct(row['test'][f])}{'**' if f == row['selected'] else ''}"
                 for f in factors]
        lines.append(f"| {row['init']} | " + " | ".join(cells) + f" | ×{row['selected']:g} |")
    return lines


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def ci_cell(c: dict, d="d", lo="ci_low", hi="ci_high") -> str:
    return f"{100 * c[d]:+.2f} [{100 * c[lo]:+.2f}, {100 * c[hi]:+.2f}]"


def fraction_cell(c: dict) -> str:
    return "–" if math.isnan(c["fraction"]) else f"{c['fraction']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"


def markdown(name: str, rows, comparisons, gaps, decomposition, curves, wall, verdict_lines, protocol: dict | None = None,
             tuning: list[dict] | None = None) -> str:
    lines = [f"### {name}", "", *[f"- {v}" for v in verdict_lines], ""]
    if protocol:
        lines += ["Protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items()), ""]
    if tuning:
        lines += tuning_markdown(tuning) + [""]
    lines += ["| init | ×data | source acc (BN re-est.) | head-only acc | Δ vs naive [95% CI] | full FT acc | Δ vs naive [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["init"], f"{r['multiplier']:g}" if r["method"] != "scratch" else "–", _pct(r["source_acc"])]
        for phase in PHASES:
            cells.append(f"{_pct(r[f'{phase}_mean'])} ± {_pct(r[f'{phase}_std'])}")
            per_model = f", per model p={r[f'{phase}_p_pretrain']:.3g}" if f"{phase}_p_pretrain" in r else ""
            cells.append("–" if r["init"] == "naive" else f"{ci_cell(r, f'{phase}_d_naive', f'{phase}_ci_low', f'{phase}_ci_high')} p={r[f'{phase}_p']:.3g}{per_model}")
        lines.append("| " + " | ".join(cells) + " |")
    if gaps:
        lines += ["", "Oracle gap: Θ0's recipe on ×m the source data minus naive (paired, 95% t CI; p pooled and with the "
                  "pre-trained model as the unit), and the fraction of it each prediction claiming ×m closes, "
                  "(init − naive) / (oracle − naive), with a 95% bootstrap CI (pre-trained models resampled, then "
                  "pairs within each):", "",
                  "| oracle | phase | gap, points [95% CI] | p | p per model | fraction closed [95% CI] |", "|---|---|---|---|---|---|"]
        for g in gaps:
            closed = "; ".join(f"{i} {fraction_cell(c)}" for i, c in g["closed"].items()) or "–"
            per_model = f"{g['gap_p_pretrain']:.3g}" if "gap_p_pretrain" in g else "–"
            lines.append(f"| {g['oracle']} | {g['phase']} | {ci_cell(g, 'gap', 'gap_ci_low', 'gap_ci_high')} | {g['gap_p']:.3g} | {per_model} | {closed} |")
    if comparisons:
        several = "p_pretrain" in comparisons[0]
        lines += ["", f"KNOW comparisons ({len(comparisons)} tests; Holm-adjusted within each method"
                  + ("; p with pre-training seeds as the unit, and that Holm-adjusted" if several else "") + "):", "",
                  "| KNOW init | vs | phase | Δ acc (points) [95% CI] | p | p Holm |" + (" p per model | p per model Holm |" if several else "") + " wins/n |",
                  "|---|---|---|---|---|---|" + ("---|---|" if several else "") + "---|"]
        for c in comparisons:
            lines.append(f"| {c['init']} | {c['reference']} | {c['phase']} | {ci_cell(c)} | {c['p']:.3g} | {c['p_holm']:.3g} |"
                         + (f" {c['p_pretrain']:.3g} | {c['p_pretrain_holm']:.3g} |" if several else "") + f" {c['wins']}/{c['n']} |")
    if decomposition:
        lines += ["", "Update decomposition u = Θ̂ − Θ0 (pre-training seed 1st): λ = fitted shrink (1 = none), R² of "
                  "u ≈ (λ−1)Θ0, and of u ≈ (λ−1)Θ0 + β(Θ0−Θ1); ‖u‖/‖Θ0‖.", "",
                  "| init | λ | R² shrink | R² shrink + direction | ‖u‖/‖Θ0‖ |", "|---|---|---|---|---|"]
        for d in decomposition:
            lines.append(f"| {d['init']} | {d['lambda']:.4f} | {d['r2_shrink']:.3f} | {d['r2_shrink_dir']:.3f} | {d['update_rel']:.4f} |")
    lines += ["", "Source-task accuracy by stage (Θ0 … Θ4), BN statistics re-estimated / kept:", ""]
    for seed, c in curves.items():
        lines.append(f"- pre-training seed {seed}: " + " ".join(_pct(a) for a in c["bn_reestimated"]) +
                     " / " + " ".join(_pct(a) for a in c["bn_kept"]))
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in wall.items())]
    return "\n".join(lines) + "\n"
def ceiling_verdicts(gaps: list[dict]) -> list[str]:
    """Is there anything to recover? The oracle gap per ×data and phase, and what our KNOWN closes of it."""
    out = []
    for g in gaps:
        label = "head-only" if g["phase"] == "head" else "full fine-tuning"
        clear = g["gap_ci_low"] > 0
        line = (f"ceiling ×{g['multiplier']:g} ({label}): really training on ×{g['multiplier']:g} the data gives "
                f"{ci_cell(g, 'gap', 'gap_ci_low', 'gap_ci_high')} points (p={g['gap_p']:.3g}) — "
                + ("a gain a perfect KNOW could show." if clear else
                   f"not clearly above zero at n={g['n']}: no predictor could show a gain here."))
        ours = {i: c for i, c in g["closed"].items() if i.startswith("known-") and not i.startswith("known-official")}
        if ours:
            line += " Our KNOWN closes " + "; ".join(f"{i}: {fraction_cell(c)}" for i, c in ours.items()) + " of it."
        out.append(line)
    return out


def bar_hits(comparisons, gaps, refs: tuple[str, ...], key: str) -> list[str]:
    """Our KNOWN's initialisations that after full fine-tuning beat every reference whose name starts with one
    of ``refs`` (each present; Δ > 0 and ``key`` < 0.05) and close ≥ 25% of the ×2 oracle gap."""
    ours = [c for c in comparisons if c["method"] == "known" and c["phase"] == "full"]
    hits = []
    for init in sorted({c["init"] for c in ours}):
        cs = [c for c in ours if c["init"] == init and c["reference"].startswith(refs)]
        present = all(any(c["reference"].startswith(r) for c in cs) for r in refs)
        beats = present and all(c["d"] > 0 and c.get(key, math.nan) < 0.05 for c in cs)
        closed = [g["closed"][init]["fraction"] for g in gaps if g["phase"] == "full" and g["multiplier"] == 2 and init in g["closed"]]
        if beats and closed and closed[0] >= 0.25:
            hits.append(init)
    return hits


def oracle_bars(comparisons, gaps, tuned: bool) -> list[str]:
    """The two bars a KNOW gain must clear to mean "more data": beating naive, TaskVector and shrink-and-perturb
    (Holm p < 0.05), and beating naive and its own pure shrink with the pre-trained model as the unit (Holm
    within our KNOWN's tests) — each closing ≥ 25% of the ×2 oracle gap."""
    out = []
    if any(c["reference"].startswith("sp-") for c in comparisons):
        hits = bar_hits(comparisons, gaps, ("naive", "taskvector", "sp-"), "p_holm")
        out.append("target (our KNOWN, full FT, beats naive, TaskVector and shrink-and-perturb at Holm p < 0.05 and closes "
                   "≥ 25% of the ×2 oracle gap): " + (", ".join(hits) if hits else "not met") + ".")
    if comparisons and "p_pretrain_holm" in comparisons[0]:
        hits = bar_hits(comparisons, gaps, ("naive", "shrink-"), "p_pretrain_holm")
        out.append(("each arm at its selected learning rate, " if tuned else "") + "our KNOWN, full FT, beats naive and its own "
                   "pure shrink with the pre-trained model as the unit (Holm p < 0.05) and closes ≥ 25% of the ×2 oracle gap: "
                   + (", ".join(hits) if hits else "not met") + ".")
    return out


def verdicts(rows, comparisons, curves, test_n: int, gaps: list[dict] = (), tuned: bool = False) -> list[str]:
    """Plain-language conclusions the numbers support (and nothing more)."""
    out = []
    by = {r["init"]: r for r in rows}
    for phase, label in (("head", "head-only phase"), ("full", "full fine-tuning")):
        if "scratch" not in by:
            break
        s = by["scratch"]
        d, lo, p = -s[f"{phase}_d_naive"], -s[f"{phase}_ci_high"], s[f"{phase}_p"]
        clear = lo > 0 and p < 0.05
        out.append(f"pre-training vs scratch ({label}): {100 * d:+.2f} points (CI low {100 * lo:+.2f}, p={p:.3g}) — "
                   + ("pre-training helps clearly." if clear else "pre-training does NOT beat scratch clearly: this phase cannot show anything."))
    for seed, c in curves.items():
        a0, a4 = c["bn_reestimated"][0], c["bn_reestimated"][-1]
        se = math.sqrt(max(a0 * (1 - a0) + a4 * (1 - a4), 1e-12) / test_n)
        out.append(f"forgetting (seed {seed}): source accuracy Θ0 {100 * a0:.2f} → Θ4 {100 * a4:.2f} ({100 * (a0 - a4):+.2f} points, "
                   f"2·SE {200 * se:.2f}) — " + ("forgetting shows." if a0 - a4 > 2 * se else "no clear forgetting."))
    for phase, label in (("head", "the head-only phase"), ("full", "full fine-tuning")):
        wins = [c for c in comparisons if c["reference"] == "naive" and c["phase"] == phase and c["d"] > 0 and c["p"] < 0.05]
        for win in wins:
            others = [c for c in comparisons if c["init"] == win["init"] and c["phase"] == phase and c["reference"] != "naive"]
            vs = "; ".join(f"vs {c['reference']} {100 * c['d']:+.2f} (p={c['p']:.3g})" for c in others)
            ok = bool(others) and all(c["d"] > 0 and c["p"] < 0.05 for c in others)
            out.append(f"{win['init']} beats naive after {label} ({100 * win['d']:+.2f}, p={win['p']:.3g}, Holm {win['p_holm']:.3g}"
                       + (f", over pre-training seeds p={win['p_pretrain']:.3g}" if "p_pretrain" in win else "") + ")"
                       + (f"; {vs}" if vs else "") + (" — beats every control at its step." if ok else " — but not every control at its step."))
        if not wins:
            out.append(f"no KNOW initialisation beats naive transfer with p < 0.05 after {label}.")
    out += ceiling_verdicts(list(gaps))
    out.append(target(comparisons))
    if gaps:
        out += oracle_bars(comparisons, gaps, tuned)
    return out


def target_hits(ours, key: str) -> list[str]:
    """Issue 4's bar: where our KNOWN beats naive and TaskVector at the same step and phase with ``key``
    (p, p_holm or p_pretrain) < 0.05. ``ours``: the comparisons of our KNOWN only (``target_results``)."""
    hits = []
    for c in ours:
        if c["reference"] == "naive" and c["d"] > 0 and c[key] < 0.05:
            tv = [t for t in ours if t["init"] == c["init"] and t["phase"] == c["phase"] and t["reference"].startswith("taskvector")]
            if tv and all(t["d"] > 0 and t[key] < 0.05 for t in tv):
                hits.append(f"{c['init']} {c['phase']}")
    return hits


def target_results(comparisons) -> dict[str, list[str]] | None:
    """``target_hits`` under each test the experiment has (raw p, Holm, and the pre-training seed as the unit
    where there are several); None when our KNOWN was not evaluated. "Ours" is method ``known``: the authors'
    ``known-official`` does not count."""
    ours = [c for c in comparisons if c["method"] == "known"]
    if not ours:
        return None
    return {key: target_hits(ours, key) for key in ["p", "p_holm"] + (["p_pretrain"] if "p_pretrain" in ours[0] else [])}


def target(comparisons) -> str:
    res = target_results(comparisons)
    if res is None:
        return "target (our KNOWN beats naive and TaskVector, p < 0.05): not measured (no `known` method in this config)."
    labels = {"p": "", "p_holm": "after Holm adjustment: ", "p_pretrain": "with pre-training seeds as the unit: "}
    return "target (our KNOWN beats naive and TaskVector, p < 0.05): " + "; ".join(
        labels[key] + (", ".join(hits) or "not met") for key, hits in res.items()) + "."


