"""Plots the notebooks show and save next to their CSVs (matplotlib, one function per figure)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def importance_heatmaps(scores: dict, kind: str = "heads", bins: int = 64):
    """Return a figure of per-layer importance heat maps, one panel per criterion (neurons binned to `bins` columns)."""
    names = list(scores)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        per_layer = getattr(scores[name], kind)
        width = max(len(t) for t in per_layer)
        if kind == "neurons":
            # sort within each layer so the panel shows the distribution, binned to a readable width
            grid = np.stack([np.interp(np.linspace(0, len(t) - 1, bins), np.arange(len(t)), np.sort(t.float().numpy()))
                             for t in per_layer])
        else:
            grid = np.full((len(per_layer), width), np.nan)
            for i, t in enumerate(per_layer):
                grid[i, :len(t)] = t.float().numpy()
        # rank-normalise per layer: criteria have wildly different scales, the ordering is what pruning uses
        ranked = pd.DataFrame(grid).rank(axis=1, pct=True).to_numpy()
        im = ax.imshow(ranked, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("head" if kind == "heads" else "neuron (sorted, binned)")
        ax.set_ylabel("layer")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="within-layer rank")
    fig.suptitle(f"{kind} importance (rank within layer)")
    return fig


def metric_vs(df: pd.DataFrame, x: str, y: str = "ppl", hue: str = "criterion", logy: bool = True, title: str = ""):
    """Return a line plot of `y` against `x`, one line per value of `hue`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, part in df.sort_values(x).groupby(hue, sort=True):
        ax.plot(part[x], part[y], marker="o", label=str(key))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def pareto(df: pd.DataFrame, x: str, y: str = "ppl", label: str = "variant", title: str = "", logy: bool = False):
    """Return a scatter of quality against cost with every point labelled and the Pareto front drawn."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    ax.scatter(df[x], df[y], s=40, zorder=3)
    for _, r in df.iterrows():
        ax.annotate(str(r[label]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], math.inf
    for _, r in df.sort_values(x).iterrows():  # lower cost and lower y are both better
        if r[y] < best:
            front.append((r[x], r[y]))
            best = r[y]
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="grey", zorder=2, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return fig


def stage_bars(df: pd.DataFrame, metrics: list[str], label: str = "variant"):
    """Return one bar panel per metric, variants side by side."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 4.0), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        ax.bar(df[label].astype(str), df[m])
        ax.set_title(m)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curve(history: pd.DataFrame, title: str = ""):
    """Return the training-loss curve (columns step, loss)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return fig


def budget_curve(df: pd.DataFrame, baseline: dict | None = None, x: str = "steps"):
    """Return a recovery budget curve: perplexities (in-domain, fidelity, held-out; the unpruned model's dashed)
    and semantic retention (with its interval) against `x`, the training steps (0: before recovery)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    df = df.sort_values(x)
    for col, label in (("ppl", "in-domain"), ("fidelity_ppl", "fidelity"), ("heldout_ppl", "held-out prose")):
        if col not in df:
            continue
        line = left.plot(df[x], df[col], marker="o", label=label)[0]
        if baseline and baseline.get(col) == baseline.get(col):  # NaN-safe
            left.axhline(baseline[col], ls="--", color=line.get_color(), alpha=0.6)
    left.set_ylabel("perplexity (dashed: unpruned)")
    right.plot(df[x], df["semantic_cosine"], marker="o", color="black", label="semantic cosine")
    if {"semantic_ci_low", "semantic_ci_high"} <= set(df.columns):
        right.fill_between(df[x], df["semantic_ci_low"], df["semantic_ci_high"], alpha=0.2, color="gray")
    right.set_ylabel("semantic retention (95% interval)")
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=16)
        ax.set_xlabel(f"{x} (0: before recovery)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def iqr_inliers(values, k: float = 1.5) -> np.ndarray:
    """Return a boolean mask of the values inside [Q1 - k IQR, Q3 + k IQR] (Tukey's fences)."""
    v = np.asarray(values, dtype=float)
    q1, q3 = np.nanquantile(v, [0.25, 0.75])
    return (v >= q1 - k * (q3 - q1)) & (v <= q3 + k * (q3 - q1))


def scatter_trend(df: pd.DataFrame, x: str, y: str, hue: str = "controller", title: str = ""):
    """Return a scatter of `y` against `x`, one colour and one least-squares trendline per `hue`, IQR outliers of `y`
    (per hue) left out and counted in the legend."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for key, part in df.groupby(hue, sort=False):
        keep = part[iqr_inliers(part[y])]
        dots = ax.scatter(keep[x], keep[y], s=22, alpha=0.75,
                          label=f"{key} ({len(part) - len(keep)} outliers removed)" if len(keep) < len(part)
                          else str(key))
        if len(keep) >= 2 and keep[x].nunique() > 1:
            slope, icept = np.polyfit(keep[x], keep[y], 1)
            xs = np.linspace(keep[x].min(), keep[x].max(), 20)
            ax.plot(xs, slope * xs + icept, color=dots.get_facecolor()[0], linewidth=1.2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig
