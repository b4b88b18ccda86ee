"""The evaluation's figures as PNGs (matplotlib's object API with the Agg canvas: no pyplot, no global state).

- ``similarity_figure``: violin + box plots of per-render identity similarity (paper figure 4 left), and of
  the similarity to the neutral front render per expression (figure 6 right);
- ``comparison_figure``: the same violins, one per run, side by side;
- ``per_view_figure``: a heat-map table of the mean similarity per view (elevation x azimuth);
- ``tsne_figure``: t-SNE of render embeddings, coloured by run, marked by expression (figure 6 middle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from idto3d.core.atomic import atomic_write

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8", "d")
TSNE_SEED = 0


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI, bbox_inches="tight"))


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v)]


def _violins(ax, groups: Mapping[str, Sequence[float]], ylabel: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    labels = list(groups)
    data = [_finite(groups[k]) for k in labels]
    pos = np.arange(1, len(labels) + 1)
    # A violin needs a spread to estimate a density; single or identical values are shown as points only.
    spread = [i for i, d in enumerate(data) if d.size >= 2 and np.ptp(d) > 0]
    if spread:
        parts = ax.violinplot([data[i] for i in spread], positions=pos[spread], widths=0.8, showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.35)
    filled = [i for i, d in enumerate(data) if d.size]
    if filled:
        ax.boxplot([data[i] for i in filled], positions=pos[filled], widths=0.18, showfliers=False,
                   medianprops={"color": "black"})
    rng = np.random.default_rng(0)
    for p, d in zip(pos, data):
        ax.scatter(p + rng.uniform(-0.06, 0.06, d.size), d, s=8, color="black", alpha=0.5, zorder=3)
        if d.size == 0:
            ax.text(p, 0.5, "no face found", ha="center", va="center", transform=ax.get_xaxis_transform(),
                    color="grey")
    ax.set_xticks(pos, [f"{k}\n(n={d.size})" for k, d in zip(labels, data)])
    ax.set_xlim(0.4, len(labels) + 0.6)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def similarity_figure(path: str | Path, to_references: Mapping[str, Sequence[float]],
                      to_front: Mapping[str, Sequence[float]] | None = None, title: str = "") -> Path:
    """Left: cosine similarity of renders to the reference photos per group; right (when ``to_front`` is
    given): cosine similarity to the neutral front render per expression."""
    panels = 2 if to_front else 1
    fig = Figure(figsize=(max(4.0, 1.3 * len(to_references) + 1.5) * panels, 4.2))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _violins(axes[0], to_references, "cosine similarity to references")
    axes[0].set_title("renders vs reference photos")
    if to_front:
        _violins(axes[1], to_front, "cosine similarity to neutral front")
        axes[1].set_title("expressions vs neutral front view")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def comparison_figure(path: str | Path, runs: Mapping[str, Sequence[float]], title: str = "") -> Path:
    """One violin + box per run (figure 4 left), against the same reference photos."""
    fig = Figure(figsize=(max(4.5, 1.4 * len(runs) + 1.5), 4.2))
    ax = fig.subplots()
    _violins(ax, runs, "cosine similarity to references")
    ax.set_title(title or "identity similarity per run")
    return _save(fig, path)


def per_view_figure(path: str | Path, elevations: Sequence[float], azimuths: Sequence[float], cosine: np.ndarray,
                    distance: np.ndarray, faces: np.ndarray, threshold: float | None = None, title: str = "") -> Path:
    """A table of views (rows: elevation, top = highest; columns: azimuth): colour and first number = mean
    cosine over expressions, second = mean identity distance, third = faces found / renders."""
    cos = np.asarray(cosine, dtype=np.float64).reshape(len(elevations), len(azimuths))
    dist = np.asarray(distance, dtype=np.float64).reshape(cos.shape)
    found = np.asarray(faces).reshape(cos.shape[0], cos.shape[1], 2)
    fig = Figure(figsize=(1.0 * len(azimuths) + 2.2, 0.85 * len(elevations) + 1.6))
    ax = fig.subplots()
    ok = np.isfinite(cos)
    lo, hi = (float(cos[ok].min()), float(cos[ok].max())) if ok.any() else (0.0, 1.0)
    if hi - lo < 1e-3:
        lo, hi = lo - 0.01, hi + 0.01
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(cos), origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    for r in range(cos.shape[0]):
        for c in range(cos.shape[1]):
            n_found, n_all = found[r, c]
            if ok[r, c]:
                mark = "*" if threshold is not None and dist[r, c] < threshold else ""
                text = f"{cos[r, c]:.3f}\nd {dist[r, c]:.3f}{mark}\n{n_found}/{n_all}"
                bright = (cos[r, c] - lo) / (hi - lo) > 0.6
            else:
                text, bright = f"no face\n0/{n_all}", True
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
    ax.set_xticks(range(len(azimuths)), [f"{a:.3g}" for a in azimuths])
    ax.set_yticks(range(len(elevations)), [f"{e:.3g}" for e in elevations])
    ax.set_xlabel("azimuth (deg; + = camera toward the head's left)")
    ax.set_ylabel("elevation (deg)")
    fig.colorbar(im, ax=ax, label="mean cosine similarity")
    note = f"  (* distance < {threshold:g}: same person)" if threshold is not None else ""
    ax.set_title((title + "\n" if title else "") + f"per view: cosine / distance / faces found{note}", fontsize=9)
    return _save(fig, path)


def tsne_points(embeddings: np.ndarray, seed: int = TSNE_SEED) -> np.ndarray:
    """2-D t-SNE of ``[N, D]`` embeddings (N >= 3), perplexity adapted to N (at most 30, below N / 3)."""
    from sklearn.manifold import TSNE

    n = len(embeddings)
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(np.asarray(embeddings, dtype=np.float64))


def tsne_figure(path: str | Path, embeddings: np.ndarray, groups: Sequence[str], expressions: Sequence[str],
                title: str = "", precomputed: bool = False) -> Path:
    """t-SNE of embeddings (``precomputed``: ``embeddings`` are already the 2-D points): colour = group (run,
    or "references", drawn as stars), marker = expression. With fewer than 3 points the figure says so."""
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    n = len(embeddings)
    if n < 3:
        ax.text(0.5, 0.5, f"t-SNE needs at least 3 faces, found {n}", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    xy = np.asarray(embeddings) if precomputed else tsne_points(embeddings)
    group_names = list(dict.fromkeys(groups))
    expr_names = list(dict.fromkeys(e for e in expressions if e))
    colours = {g: f"C{i % 10}" for i, g in enumerate(n for n in group_names if n != "references")}
    colours["references"] = "black"
    groups, expressions = np.asarray(groups), np.asarray(expressions)
    for g in group_names:
        for k, e in enumerate(expr_names + [""]):
            sel = (groups == g) & (expressions == e)
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=70 if e == "" else 28, c=colours[g],
                           marker="*" if e == "" else MARKERS[k % len(MARKERS)], alpha=0.85,
                           edgecolors="white", linewidths=0.4)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*" if g == "references" else "o", linestyle="", color=colours[g], label=g)
               for g in group_names]
    handles += [Line2D([], [], marker=MARKERS[k % len(MARKERS)], linestyle="", color="grey", label=e)
                for k, e in enumerate(expr_names)]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of identity embeddings ({n} faces)")
    return _save(fig, path)
