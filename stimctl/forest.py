"""A meta-analysis forest plot: one row per site (estimate and 95 % interval, the marker
sized by its random-effects weight), then the fixed-effect and random-effects (DL, REML)
pooled estimates as diamonds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_forest(term: dict[str, Any], path: Path, title: str) -> Path:
    """Write the forest plot of one coefficient's meta-analysis (`result["meta"][i]`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    sites = term["sites"]
    pooled = [("fixed effect", term["fixed"]), ("random, DL", term["dl"]),
              ("random, REML", term["reml"])]
    rows = len(sites) + len(pooled)
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.45 * rows))
    labels = []
    for i, s in enumerate(sites):
        y = rows - i
        ax.plot([s["ci_low"], s["ci_high"]], [y, y], color="black", lw=1)
        ax.plot(s["estimate"], y, "s", color="tab:blue",
                markersize=4 + 10 * float(s.get("weight_dl", 0.3)))
        labels.append((y, f"{s['site']} (n={s['n']})"))
    for j, (name, p) in enumerate(pooled):
        y = len(pooled) - j
        est, lo, hi = p["estimate"], p["ci_low"], p["ci_high"]
        ax.fill([lo, est, hi, est], [y, y + 0.25, y, y - 0.25], color="tab:red", alpha=0.8)
        labels.append((y, name))
    ax.axvline(term["fixed"]["estimate"], color="grey", ls=":", lw=1)
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels])
    h = term["heterogeneity"]
    ax.set_title(f"{title}\nI² = {100 * h['i2']:.0f} %, τ² (DL) = {term['dl']['tau2']:.3g}, "
                 f"Q = {h['q']:.3g} (df {h['df']})", fontsize=9)
    ax.set_xlabel(f"{term['term']}: estimate and 95 % CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
