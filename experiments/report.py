"""The comparison report: summary.json, report.md, report.html and the plots behind them.

Per arm: mean and 95 % CI over seeds (Student t) of balanced accuracy, macro-F1, AUC, minority-
class sensitivity and accuracy. Each arm is compared with the baseline on the same seeds (paired
t-test or Wilcoxon; p-values Holm-adjusted across arms for the primary metric). The verdict says
what these numbers support and nothing more.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from histosynth.checkpoint import atomic_write_text
from histosynth.stats import holm, paired_test, t_interval
from histosynth.viz import markdown_to_html

METRICS = ("balanced_accuracy", "macro_f1", "auc", "minority_sensitivity", "accuracy")
LABELS = {"balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1", "auc": "AUC (one-vs-rest)",
          "minority_sensitivity": "minority sensitivity", "accuracy": "accuracy"}


def summarise(rows: list[dict], arms: list, classes: list[str], minority: str, report_cfg,
              extra: dict) -> dict:
    """Numbers of the report from the results.csv rows (one per finished arm x seed cell)."""
    by_arm = {a.name: sorted((r for r in rows if r["arm"] == a.name), key=lambda r: int(r["seed"]))
              for a in arms}
    out = {"classes": classes, "minority": minority, "chance_balanced_accuracy": 1 / len(classes),
           "baseline": report_cfg.baseline, "primary": report_cfg.primary, "alpha": report_cfg.alpha,
           "arms": {}, "comparisons": {}, **extra}
    for a in arms:
        rs = by_arm[a.name]
        out["arms"][a.name] = {
            "seeds": [int(r["seed"]) for r in rs],
            "augment": a.augment, "sampler": a.sampler, "class_weights": a.class_weights,
            "labels": a.labels, "synthetic": a.synthetic.source,
            "n_train_real": int(rs[0]["n_train_real"]) if rs else None,
            "n_train_synthetic": int(rs[0]["n_train_synthetic"]) if rs else None,
            "metrics": {m: _clip(t_interval([float(r[m]) for r in rs]), 0.0, 1.0) for m in METRICS},
            "sensitivity": {c: t_interval([float(r[f"sensitivity:{c}"]) for r in rs])["mean"] for c in classes},
        }
    base = {int(r["seed"]): r for r in by_arm[report_cfg.baseline]}
    compared = [a.name for a in arms if a.name != report_cfg.baseline]
    for name in compared:
        common = [r for r in by_arm[name] if int(r["seed"]) in base]
        out["comparisons"][name] = {
            m: paired_test([float(r[m]) for r in common], [float(base[int(r["seed"])][m]) for r in common],
                           report_cfg.test) for m in METRICS}
    for name in compared:
        for m in METRICS:
            _clip(out["comparisons"][name][m], -1.0, 1.0)
    # the family of the Holm correction: the arms whose effect is in question, not the controls
    family = [a.name for a in arms if a.name != report_cfg.baseline and a.labels != "shuffled"]
    adj = holm([out["comparisons"][n][report_cfg.primary]["p"] for n in family])
    for n, p in zip(family, adj):
        out["comparisons"][n][report_cfg.primary]["p_holm"] = p
    out["verdict"] = verdict(out, arms)
    return out


def _clip(d: dict, lo: float, hi: float) -> dict:
    """A t interval cut to the metric's range (3 seeds give intervals wider than [0, 1])."""
    for k in ("ci_low", "ci_high"):
        if k in d and not math.isnan(d[k]):
            d[k] = min(hi, max(lo, d[k]))
    return d


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def verdict(s: dict, arms: list) -> str:
    prim, base, alpha = s["primary"], s["baseline"], s["alpha"]
    label = LABELS[prim]
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
        (helped if c["p_holm"] < alpha and c["mean_diff"] > 0 else
         hurt if c["p_holm"] < alpha and c["mean_diff"] < 0 else flat).append(desc)
    b = s["arms"][base]["metrics"][prim]
    parts.append(f"Baseline {base}: {label} {_fmt(b['mean'])} (95 % CI {_fmt(b['ci_low'])}-{_fmt(b['ci_high'])}) "
                 f"over {n_seeds} seed(s) on {s.get('n_test', '?')} real test tiles.")
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
    for a in controls:
        m = s["arms"][a.name]["metrics"]["balanced_accuracy"]
        chance = s["chance_balanced_accuracy"]
        if math.isnan(m["mean"]):
            continue
        if m["mean"] <= chance + 0.1 or (not math.isnan(m["ci_low"]) and m["ci_low"] <= chance):
            parts.append(f"The label-shuffled control {a.name} stayed near chance (balanced accuracy "
                         f"{_fmt(m['mean'])}; chance {chance:.3f}), as it must.")
        else:
            parts.append(f"WARNING: the label-shuffled control {a.name} reached balanced accuracy "
                         f"{_fmt(m['mean'])}, well above chance ({chance:.3f}): something other than "
                         "the labels carries class information (leakage or a confound); do not trust "
                         "the other arms until this is explained.")
    if n_seeds < 5:
        parts.append(f"With only {n_seeds} seed(s) these intervals are wide and small effects cannot be "
                     "resolved; run the full protocol (configs/compare.yaml, >= 5 seeds) before drawing "
                     "conclusions.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# plots


def plots(s: dict, rows: list[dict], out: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from sklearn.metrics import roc_curve

    sns.set_theme(style="whitegrid", context="notebook")
    figs: dict[str, str] = {}
    names = list(s["arms"])
    classes = s["classes"]
    palette = dict(zip(names, sns.color_palette("deep", len(names))))

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        figs[name.removesuffix(".png")] = name

    keys = ("balanced_accuracy", "macro_f1", "auc", "minority_sensitivity")
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
        if key == "balanced_accuracy":
            ax.axhline(s["chance_balanced_accuracy"], color="grey", ls=":", lw=1, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(LABELS[key], fontsize=10)
    save(fig, "metrics_by_arm.png")

    heat = np.array([[s["arms"][n]["sensitivity"][c] for c in classes] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 0.45 * len(names) + 1.5))
    sns.heatmap(heat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", xticklabels=classes,
                yticklabels=names, ax=ax, cbar_kws={"label": "sensitivity"})
    ax.set_title("per-class sensitivity (mean over seeds)")
    save(fig, "per_class_sensitivity.png")

    preds = {n: [np.load(Path(r["cell_dir"]) / "test_predictions.npz") for r in rows
                 if r["arm"] == n and (Path(r["cell_dir"]) / "test_predictions.npz").is_file()] for n in names}
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.2 * rows_n), squeeze=False)
    for ax, n in zip(axes.flat, names):
        if not preds[n]:
            ax.set_visible(False)
            continue
        k = len(classes)
        cm = sum(np.bincount(p["labels"] * k + p["probs"].argmax(1), minlength=k * k).reshape(k, k)
                 for p in preds[n])
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        sns.heatmap(norm, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="Blues", cbar=False, ax=ax,
                    xticklabels=classes, yticklabels=classes)
        ax.set_title(f"{n} ({len(preds[n])} seeds)", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    save(fig, "confusion_matrices.png")

    fig, axes = plt.subplots(1, len(classes), figsize=(3.3 * len(classes), 3.3), squeeze=False)
    for ci, (ax, c) in enumerate(zip(axes[0], classes)):
        for n in names:
            if not preds[n]:
                continue
            y = np.concatenate([p["labels"] for p in preds[n]]) == ci
            score = np.concatenate([p["probs"][:, ci] for p in preds[n]])
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, score)
                ax.plot(fpr, tpr, lw=1.2, color=palette[n], label=n)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set_title(f"{c} vs rest (pooled seeds)", fontsize=9)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save(fig, "roc_curves.png")
    return figs


# ----------------------------------------------------------------------------------------------
# text


def render_markdown(s: dict, figs: dict[str, str]) -> str:
    base, prim = s["baseline"], s["primary"]
    L = ["# histosynth augment-compare report", "", "## Verdict", "", s["verdict"], "",
         "## Per arm: mean and 95 % CI over seeds (real test set)", "",
         "| arm | seeds | train real + synthetic | " + " | ".join(LABELS[m] for m in METRICS) + " |",
         "|" + "---|" * (3 + len(METRICS))]
    for n, a in s["arms"].items():
        cells = [f"{_fmt(a['metrics'][m]['mean'])} [{_fmt(a['metrics'][m]['ci_low'])}, "
                 f"{_fmt(a['metrics'][m]['ci_high'])}]" for m in METRICS]
        L.append(f"| {n} | {len(a['seeds'])} | {a['n_train_real']} + {a['n_train_synthetic']} | " + " | ".join(cells) + " |")
    L += ["", f"## Paired comparison with {base} (difference arm - {base}, same seeds)", "",
          f"Test: {next(iter(next(iter(s['comparisons'].values())).values()))['test'] if s['comparisons'] else 'n/a'}; "
          f"p-values of the primary metric ({LABELS[prim]}) are Holm-adjusted across the compared arms "
          "(label-shuffled controls excluded); intervals are Student-t over seeds, cut to the metric's "
          "range.", "",
          "| arm | metric | difference | 95 % CI | p | Holm p |", "|---|---|---|---|---|---|"]
    for n, comp in s["comparisons"].items():
        for m in METRICS[:4]:
            c = comp[m]
            L.append(f"| {n} | {LABELS[m]} | {_fmt(c['mean_diff'], True)} | [{_fmt(c['ci_low'], True)}, "
                     f"{_fmt(c['ci_high'], True)}] | {_p(c['p'])} | {_p(c.get('p_holm', math.nan)) if m == prim else ''} |")
    L += ["", "## Arms", "", "| arm | augmentation | sampler | class weights | labels | synthetic |",
          "|---|---|---|---|---|---|"]
    for n, a in s["arms"].items():
        L.append(f"| {n} | {a['augment']} | {a['sampler']} | {a['class_weights']} | {a['labels']} | {a['synthetic']} |")
    L += ["", "## Data and safeguards", ""]
    for k, v in s.get("data", {}).items():
        L.append(f"- {k}: {v}")
    for k, v in s.get("leakage", {}).items():
        L.append(f"- leakage check, {k}: {v}")
    L.append(f"- minority class (fewest real training tiles): {s['minority']}")
    for title, key in (("Metrics by arm (bars: mean, whiskers: 95 % CI, dots: seeds)", "metrics_by_arm"),
                       ("Per-class sensitivity", "per_class_sensitivity"),
                       ("Confusion matrices (summed over seeds, rows normalised)", "confusion_matrices"),
                       ("ROC curves", "roc_curves")):
        if key in figs:
            L += ["", f"## {title}", "", f"![{key}]({figs[key]})"]
    return "\n".join(L) + "\n"


def write_report(s: dict, rows: list[dict], out: Path) -> dict:
    figs = plots(s, rows, out) if rows else {}
    md = render_markdown(s, figs)
    atomic_write_text(out / "summary.json", json.dumps(s, indent=1, default=float))
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", markdown_to_html(md, out, "histosynth augment-compare report"))
    return figs
