"""The comparison report: summary.json, report.md, report.html and the plots behind them.

Generic over the downstream task: its :class:`~histosynth.roles.MetricSpec` says which metrics
there are (labels, ranges, which is primary) and where chance lies. Per arm: mean and 95 % CI over
seeds (Student t) of every metric. Each arm is compared with the baseline on the same seeds
(paired test; p-values of the primary metric Holm-adjusted across arms). The verdict says what
these numbers support and nothing more. Task-specific figures come from the task's ``plots``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from histosynth.checkpoint import atomic_write_text
from histosynth.roles import MetricSpec
from histosynth.stats import holm, paired_test, t_interval
from histosynth.viz import markdown_to_html


def summarise(rows: list[dict], arms: list, spec: MetricSpec, chance: dict[str, float], report_cfg,
              extra: dict) -> dict:
    """Numbers of the report from the results.csv rows (one per finished arm x seed cell)."""
    by_arm = {a.name: sorted((r for r in rows if r["arm"] == a.name), key=lambda r: int(r["seed"]))
              for a in arms}
    # metrics no cell measured (per-group metrics without a groups file) are left out
    spec = MetricSpec(tuple(m for m in spec.metrics if m.name == report_cfg.primary or any(
        math.isfinite(float(r.get(m.name, "nan") or "nan")) for r in rows)), spec.primary, spec.control)
    out = {"metrics": {m.name: {"label": m.label, "higher_is_better": m.higher_is_better,
                                "bounds": list(m.bounds) if m.bounds else None, "plotted": m.plotted}
                       for m in spec.metrics},
           "chance": dict(chance), "control_metric": spec.control,
           "baseline": report_cfg.baseline, "primary": report_cfg.primary, "alpha": report_cfg.alpha,
           "arms": {}, "comparisons": {}, **extra}
    for a in arms:
        rs = by_arm[a.name]
        out["arms"][a.name] = {
            "seeds": [int(r["seed"]) for r in rs],
            "augment": a.augment, "stain_norm": a.stain_norm, "sampler": a.sampler, "class_weights": a.class_weights,
            "labels": a.labels, "synthetic": a.synthetic.source,
            "n_train_real": int(rs[0]["n_train_real"]) if rs else None,
            "n_train_synthetic": int(rs[0]["n_train_synthetic"]) if rs else None,
            "metrics": {m.name: _clip(t_interval([float(r[m.name]) for r in rs]), m.bounds) for m in spec.metrics},
        }
    base = {int(r["seed"]): r for r in by_arm[report_cfg.baseline]}
    compared = [a.name for a in arms if a.name != report_cfg.baseline]
    for name in compared:
        common = [r for r in by_arm[name] if int(r["seed"]) in base]
        out["comparisons"][name] = {
            m.name: _clip(paired_test([float(r[m.name]) for r in common],
                                      [float(base[int(r["seed"])][m.name]) for r in common], report_cfg.test),
                          _difference_bounds(m.bounds))
            for m in spec.metrics}
    # the family of the Holm correction: the arms whose effect is in question, not the controls
    family = [a.name for a in arms if a.name != report_cfg.baseline and a.labels != "shuffled"]
    adj = holm([out["comparisons"][n][report_cfg.primary]["p"] for n in family])
    for n, p in zip(family, adj):
        out["comparisons"][n][report_cfg.primary]["p_holm"] = p
    out["verdict"] = verdict(out, arms)
    return out


def _difference_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    return (bounds[0] - bounds[1], bounds[1] - bounds[0]) if bounds else None


def _clip(d: dict, bounds: tuple[float, float] | None) -> dict:
    """A t interval cut to the metric's range (3 seeds give intervals wider than [0, 1])."""
    if bounds is None:
        return d
    lo, hi = bounds
    for k in ("ci_low", "ci_high"):
        if k in d and not math.isnan(d[k]):
            d[k] = float(min(hi, max(lo, d[k])))
    return d


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def verdict(s: dict, arms: list) -> str:
    prim, base, alpha = s["primary"], s["baseline"], s["alpha"]
    label = s["metrics"][prim]["label"]
    better_sign = 1 if s["metrics"][prim]["higher_is_better"] else -1
    n_seeds = len(s["arms"][base]["seeds"])
    parts, helped, hurt, flat = [], [], [], []
    controls = [a for a in arms if a.labels == "shuffled"]
    for a in arms:
        if a.name == base or a.labels == "shuffled":
            continue
        c = s["comparisons"][a.name][prim]
        if c["n"] < 2 or math.isnan(c.get("p_holm", math.nan)):
            flat.append(f"{a.name} (fewer than two paired seeds: not tested)")
            continue
        desc = (f"{a.name} ({_fmt(c['mean_diff'], True)}, 95 % CI {_fmt(c['ci_low'], True)} to "
                f"{_fmt(c['ci_high'], True)}, Holm-adjusted p {_p(c['p_holm'])})")
        (helped if c["p_holm"] < alpha and better_sign * c["mean_diff"] > 0 else
         hurt if c["p_holm"] < alpha and better_sign * c["mean_diff"] < 0 else flat).append(desc)
    b = s["arms"][base]["metrics"][prim]
    parts.append(f"Baseline {base}: {label} {_fmt(b['mean'])} (95 % CI {_fmt(b['ci_low'])}-{_fmt(b['ci_high'])}) "
                 f"over {n_seeds} seed(s) on {s.get('n_test', '?')} real test {s.get('test_unit', 'tiles')}.")
    if helped:
        parts.append(f"Significantly better than {base} at alpha {alpha}: " + "; ".join(helped) + ".")
    if hurt:
        parts.append(f"Significantly worse than {base}: " + "; ".join(hurt) + ".")
    if flat:
        parts.append(f"No significant difference from {base}: " + "; ".join(flat) + ".")
    synth = [a.name for a in arms if a.synthetic.source != "none" and a.labels == "real"]
    if synth:
        good = [n for n in synth if any(h.startswith(n + " ") for h in helped)]
        if good:
            parts.append(f"Synthetic data improved {label} in {len(good)} of {len(synth)} synthetic arm(s) "
                         f"({', '.join(good)}).")
        else:
            parts.append(f"The numbers do not support that synthetic data improves {label} here: none of "
                         f"the {len(synth)} synthetic arm(s) beat {base} significantly.")
    ctrl = s.get("control_metric")
    for a in controls:
        if ctrl is None or ctrl not in s["chance"]:
            continue
        m, chance = s["arms"][a.name]["metrics"][ctrl], s["chance"][ctrl]
        what = s["metrics"][ctrl]["label"]
        if math.isnan(m["mean"]):
            continue
        if m["mean"] <= chance + 0.1 or (not math.isnan(m["ci_low"]) and m["ci_low"] <= chance):
            parts.append(f"The label-shuffled control {a.name} stayed near chance ({what} "
                         f"{_fmt(m['mean'])}; chance {chance:.3f}), as it must.")
        else:
            parts.append(f"WARNING: the label-shuffled control {a.name} reached {what} "
                         f"{_fmt(m['mean'])}, well above chance ({chance:.3f}): something other than "
                         "the labels carries class information (leakage or a confound); do not trust "
                         "the other arms until this is explained.")
    if n_seeds < 5:
        parts.append(f"With only {n_seeds} seed(s) these intervals are wide and small effects cannot be "
                     "resolved; run the full protocol (>= 5 seeds: configs/compare.yaml, compare_monuseg_gpu.yaml) "
                     "before drawing conclusions.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# plots


def plot_metrics(s: dict, rows: list[dict], out: Path) -> dict[str, str]:
    """Bars (mean), whiskers (95 % CI) and dots (seeds) per arm for every plotted metric, with the
    chance level where the task defines one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    names = list(s["arms"])
    palette = dict(zip(names, sns.color_palette("deep", len(names))))
    keys = [k for k, m in s["metrics"].items() if m["plotted"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        means = [s["arms"][n]["metrics"][key]["mean"] for n in names]
        lo = [s["arms"][n]["metrics"][key]["ci_low"] for n in names]
        hi = [s["arms"][n]["metrics"][key]["ci_high"] for n in names]
        err = np.array([[m - l if np.isfinite(l) else 0, h - m if np.isfinite(h) else 0]
                        for m, l, h in zip(means, lo, hi)]).T
        ax.bar(range(len(names)), means, yerr=err, capsize=4, color=[palette[n] for n in names], alpha=0.8)
        for i, n in enumerate(names):
            pts = [float(r[key]) for r in rows if r["arm"] == n]
            ax.scatter(np.full(len(pts), i) + np.linspace(-0.15, 0.15, max(len(pts), 1))[:len(pts)], pts,
                       color="k", s=10, zorder=3)
        if key in s["chance"]:
            ax.axhline(s["chance"][key], color="grey", ls=":", lw=1, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        bounds = s["metrics"][key]["bounds"]
        if bounds:
            ax.set_ylim(bounds[0], bounds[1] + 0.02 * (bounds[1] - bounds[0]))
        ax.set_title(s["metrics"][key]["label"], fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "metrics_by_arm.png", dpi=100)
    plt.close(fig)
    return {"Metrics by arm (bars: mean, whiskers: 95 % CI, dots: seeds)": "metrics_by_arm.png"}


# ----------------------------------------------------------------------------------------------
# text


def render_markdown(s: dict, figs: dict[str, str]) -> str:
    base, prim, metrics = s["baseline"], s["primary"], s["metrics"]
    names = list(metrics)
    L = ["# histosynth augment-compare report", "", "## Verdict", "", s["verdict"], "",
         "## Per arm: mean and 95 % CI over seeds (real test set)", "",
         "| arm | seeds | train real + synthetic | " + " | ".join(metrics[m]["label"] for m in names) + " |",
         "|" + "---|" * (3 + len(names))]
    for n, a in s["arms"].items():
        cells = [f"{_fmt(a['metrics'][m]['mean'])} [{_fmt(a['metrics'][m]['ci_low'])}, "
                 f"{_fmt(a['metrics'][m]['ci_high'])}]" for m in names]
        L.append(f"| {n} | {len(a['seeds'])} | {a['n_train_real']} + {a['n_train_synthetic']} | " + " | ".join(cells) + " |")
    tests = sorted({c[prim]["test"] for c in s["comparisons"].values()})
    L += ["", f"## Paired comparison with {base} (difference arm - {base}, same seeds)", "",
          f"Test: {'; '.join(tests) or 'n/a'}; "
          f"p-values of the primary metric ({metrics[prim]['label']}) are Holm-adjusted across the compared arms "
          "(label-shuffled controls excluded); intervals are Student-t over seeds, cut to the metric's "
          "range.", "",
          "| arm | metric | difference | 95 % CI | p | Holm p |", "|---|---|---|---|---|---|"]
    for n, comp in s["comparisons"].items():
        for m in (k for k in names if metrics[k]["plotted"]):
            c = comp[m]
            L.append(f"| {n} | {metrics[m]['label']} | {_fmt(c['mean_diff'], True)} | [{_fmt(c['ci_low'], True)}, "
                     f"{_fmt(c['ci_high'], True)}] | {_p(c['p'])} | {_p(c.get('p_holm', math.nan)) if m == prim else ''} |")
    L += ["", "## Arms", "", "| arm | augmentation | stain normalisation | sampler | class weights | labels | synthetic |",
          "|---|---|---|---|---|---|---|"]
    for n, a in s["arms"].items():
        L.append(f"| {n} | {a['augment']} | {a.get('stain_norm', 'none')} | {a['sampler']} | {a['class_weights']} | "
                 f"{a['labels']} | {a['synthetic']} |")
    L += ["", "## Data and safeguards", ""]
    for k, v in s.get("data", {}).items():
        L.append(f"- {k}: {v}")
    for k, v in s.get("leakage", {}).items():
        L.append(f"- leakage check, {k}: {v}")
    if "minority" in s:
        L.append(f"- minority class (fewest real training tiles): {s['minority']}")
    for title, file in figs.items():
        L += ["", f"## {title}", "", f"![{Path(file).stem}]({file})"]
    return "\n".join(L) + "\n"


def write_report(s: dict, rows: list[dict], out: Path, task_plots=None,
                 extra_figs: dict[str, str] | None = None) -> dict[str, str]:
    """summary.json, report.md, report.html and the figures (the generic bars, then ``task_plots``:
    the downstream task's own figures, ``(summary, rows, out) -> {title: file}``, then
    ``extra_figs``: figures already drawn under ``out``, e.g. the selections of synthetic tiles)."""
    figs = {}
    if rows:
        figs.update(plot_metrics(s, rows, out))
        if task_plots is not None:
            figs.update(task_plots(s, rows, out))
    figs.update({t: f for t, f in (extra_figs or {}).items() if (out / f).is_file()})
    md = render_markdown(s, figs)
    atomic_write_text(out / "summary.json", json.dumps(s, indent=1, default=float))
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", markdown_to_html(md, out, "histosynth augment-compare report"))
    return figs
