"""Reports a biologist can read: plots of a run's maps and one self-contained HTML file.

Modelled on the CellOT paper's figures (Bunne et al. 2023): Fig. 2, marginal densities of the
most changed features and a 2-D embedding of observed vs predicted cells; Fig. 3e, the mean
transport cost ||T(x) - x||^2 per perturbation and cell cluster. Each plot is a function that
returns a matplotlib Figure (for notebooks); `render_report` writes them as PNGs to RUN_DIR/plots/
and embeds them in one HTML file. Everything is read from the run directory (prepared cells,
predictions.h5ad of the test controls) and its store (metrics, map statuses, training curves).

matplotlib is an extra: `pip install 'perturbot[report]'`; UMAP panels appear when umap-learn is
installed, PCA ones always.
"""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from engine.api import FitResult
from engine.data import DataError, MapKey, PreparedData, read_h5ad
from engine.rundir import RunDir

COLORS = {"control": "#7f7f7f", "observed": "#1f77b4", "predicted": "#d62728"}


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a DataError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DataError("reports need matplotlib: pip install 'perturbot[report]'") from err
    return plt


@dataclass
class MapCells:
    """One map's test cells in data space: control sources, observed perturbed, predicted (+ weights)."""

    key: MapKey
    control: np.ndarray
    observed: np.ndarray
    predicted: np.ndarray
    weights: np.ndarray | None
    markers: np.ndarray  # feature indices, most changed first (ranked on train cells)


def map_cells(prepared: PreparedData, predictions: ad.AnnData, key: MapKey) -> MapCells:
    """A map's cells: its rows of predictions.h5ad aligned with its test controls by source cell."""
    control = prepared.spec.control
    rows = predictions.obs.index.str.startswith(f"{key.name}:")
    mine = predictions[rows]
    sources = prepared.cell_names(key.group, control, "test")
    order = pd.Index(mine.obs["source_cell"]).get_indexer(sources)
    if (order < 0).any():
        raise DataError(f"predictions.h5ad lacks test controls of map {key.name!r}; re-run `perturbot evaluate`")
    weights = mine.obs["weight"].to_numpy(np.float64)[order] if "weight" in mine.obs else None
    return MapCells(
        key,
        np.asarray(prepared.cells(key.group, control, "test", space="data")),
        np.asarray(prepared.cells(key.group, key.perturbation, "test", space="data")),
        np.asarray(mine.X, dtype=np.float32)[order],
        weights,
        prepared.markers[key.name],
    )


def effect_table(result: FitResult, metric: str = "mmd") -> pd.DataFrame:
    """Per map: the final test `metric` of the model beside its baselines, the ratios to identity and
    to the Bures map, the map's status and best step; largest effect (identity's distance) first."""
    summary = result.summary(metric)
    summary = summary[summary["metric"] == metric].drop(columns="metric").set_index("perturbation")
    maps = result.maps().set_index("perturbation")[["status", "best_step"]]
    table = maps.join(summary, how="left")
    table["model/identity"] = table["model"] / table["identity"]
    if "gaussian" in table:
        table["model/gaussian"] = table["model"] / table["gaussian"]
    return table.sort_values("identity", ascending=False, na_position="last").rename_axis("map").reset_index()


def _density(values: np.ndarray, grid: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian kernel density on `grid`, bandwidth by Silverman's rule (weighted when weights given)."""
    w = np.ones(len(values)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mean = float(np.sum(w * values))
    std = float(np.sqrt(np.sum(w * (values - mean) ** 2)))
    bandwidth = max(1.06 * std * len(values) ** -0.2, 1e-3 * (grid[-1] - grid[0]) + 1e-12)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return (np.exp(-0.5 * z**2) * w[None, :]).sum(axis=1) / (bandwidth * np.sqrt(2 * np.pi))


def chosen_features(names: list[str], wanted: int | list[str], markers: np.ndarray) -> list[int]:
    """Feature indices to plot: the `wanted` most changed (the map's markers), or the features named
    (exact name, else the one name that starts with it: "pS6" finds "pS6(Yb172)Dd")."""
    if isinstance(wanted, int):
        return [int(j) for j in markers[:wanted]]
    chosen = []
    for want in wanted:
        hits = [j for j, name in enumerate(names) if name == want] or [
            j for j, name in enumerate(names) if name.startswith(want)]
        if len(hits) != 1:
            found = ", ".join(names[j] for j in hits[:5]) or "none"
            raise DataError(f"feature {want!r} names {len(hits)} features of this run ({found}); give a longer name")
        chosen.append(hits[0])
    return chosen


def plot_marginals(cells: MapCells, features: list[str], chosen: list[int]) -> Any:
    """Densities of the `chosen` features (indices into `features`; see `chosen_features`) for
    control, observed and predicted cells (predicted weighted when weights exist)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 2.6), squeeze=False)
    for ax, j in zip(axes[0], chosen):
        columns = {"control": cells.control[:, j], "observed": cells.observed[:, j], "predicted": cells.predicted[:, j]}
        low = min(float(v.min()) for v in columns.values())
        high = max(float(v.max()) for v in columns.values())
        grid = np.linspace(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9), 200)
        for name, values in columns.items():
            weights = cells.weights if name == "predicted" else None
            ax.plot(grid, _density(values.astype(np.float64), grid, weights), color=COLORS[name], label=name)
        ax.set_title(features[j], fontsize=9)
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{cells.key.name}: marginal densities", fontsize=10)
    fig.tight_layout()
    return fig


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The rows of x on their first two principal axes (float64 SVD of the centred rows)."""
    centered = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centered.astype(np.float64), full_matrices=False)
    return centered @ vt[:2].T


def plot_embedding(cells: MapCells) -> Any:
    """Observed vs predicted perturbed cells (and the controls, faint) in a 2-D PCA of the three, and
    in UMAP when umap-learn is installed."""
    plt = _pyplot()
    stacked = np.concatenate([cells.control, cells.observed, cells.predicted])
    parts = {"control": len(cells.control), "observed": len(cells.observed), "predicted": len(cells.predicted)}
    views = {"PCA": pca_2d(stacked)}
    try:
        import umap

        views["UMAP"] = umap.UMAP(random_state=0).fit_transform(stacked)
    except ImportError:
        pass
    fig, axes = plt.subplots(1, len(views), figsize=(4.0 * len(views), 3.6), squeeze=False)
    for ax, (title, points) in zip(axes[0], views.items()):
        start = 0
        for name, n in parts.items():
            ax.scatter(*points[start:start + n].T, s=6, alpha=0.25 if name == "control" else 0.6,
                       color=COLORS[name], label=f"{name} ({n})", linewidths=0)
            start += n
        ax.set_title(f"{cells.key.name}: {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, frameon=False, markerscale=2)
    fig.tight_layout()
    return fig


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007): a cluster label per row."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=distance / distance.sum())] if distance.sum() > 0 else x[0])
    centres = np.array(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        moved = np.array([x[labels == c].mean(axis=0) if (labels == c).any() else centres[c] for c in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return labels


def transport_costs(cells: list[MapCells], clusters: list[np.ndarray]) -> pd.DataFrame:
    """Mean ||T(x) - x||^2 (data space) per map (rows) and cluster of its source cells (columns)."""
    names = sorted({str(c) for labels in clusters for c in np.unique(labels)})
    rows = {}
    for map_cells_, labels in zip(cells, clusters):
        cost = ((map_cells_.predicted - map_cells_.control) ** 2).sum(axis=1)
        labels = labels.astype(str)
        rows[map_cells_.key.name] = [float(cost[labels == c].mean()) if (labels == c).any() else np.nan for c in names]
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def plot_costs(costs: pd.DataFrame) -> Any:
    """Heat map of the mean transport cost per map and cell cluster (CellOT Fig. 3e)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * costs.shape[1], 1.2 + 0.28 * costs.shape[0]))
    image = ax.imshow(costs.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(costs.shape[1]), costs.columns, fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(costs.shape[0]), costs.index, fontsize=7)
    ax.set_xlabel("cell cluster of the source (control) cells", fontsize=8)
    fig.colorbar(image, ax=ax, label="mean ||T(x) - x||^2")
    fig.tight_layout()
    return fig


def plot_curves(metrics: pd.DataFrame, maps: list[str]) -> Any:
    """Training curves from the store: validation mmd per map (the maps given), then every logged
    training quantity (mean over all maps) against steps."""
    plt = _pyplot()
    valid = metrics[metrics["split"].str.startswith("valid") & (metrics["metric"] == "mmd")]
    train = metrics[(metrics["split"] == "train") & (metrics["metric"] != "train_seconds")]
    losses = sorted(train["metric"].unique())
    fig, axes = plt.subplots(1, 1 + len(losses), figsize=(3.4 * (1 + len(losses)), 2.8), squeeze=False)
    for name in maps:
        curve = valid[valid["perturbation"] == name].sort_values("step")
        axes[0][0].plot(curve["step"], curve["value"], label=name)
    axes[0][0].set_title("validation mmd", fontsize=9)
    axes[0][0].set_xlabel("step", fontsize=8)
    if maps:
        axes[0][0].legend(fontsize=6, frameon=False)
    for ax, loss in zip(axes[0][1:], losses):
        mean = train[train["metric"] == loss].groupby("step")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), color="black")
        ax.set_title(f"{loss} (mean over maps)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return fig


def plot_trials(metrics: pd.DataFrame, ranked: list[str]) -> Any:
    """A search's curves: mean validation mmd over the tuning maps against steps, one line per trial
    (the best `len(ranked)` trials of the leaderboard, best first)."""
    plt = _pyplot()
    valid = metrics[(metrics["split"] == "valid") & (metrics["metric"] == "mmd")]
    curves = valid.groupby(["trial_id", "step"])["value"].mean()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for trial in ranked:
        if trial in curves.index.get_level_values(0):
            ax.plot(curves.loc[trial].index, curves.loc[trial].to_numpy(), label=trial, marker=".")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("mean validation mmd", fontsize=8)
    ax.legend(fontsize=6, frameon=False, ncol=2)
    fig.tight_layout()
    return fig


def _png(fig: Any, path: Path) -> str:
    """Save the figure as PNG to `path` and return it base64-encoded (then close it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _image(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _clusters(prepared: PreparedData, cells: list[MapCells], n_clusters: int, cluster_key: str | None,
              dataset: str) -> list[np.ndarray]:
    """Cluster labels of each map's source cells: obs[cluster_key] of the run's dataset, else k-means
    on all maps' test controls in the training space (shared clusters across maps)."""
    control = prepared.spec.control
    names = [prepared.cell_names(c.key.group, control, "test") for c in cells]
    if cluster_key is not None:
        obs = read_h5ad(dataset).obs
        if cluster_key not in obs.columns:
            raise DataError(f"cluster key {cluster_key!r} is not an obs column of {dataset}")
        return [obs.loc[n, cluster_key].astype(str).to_numpy() for n in names]
    groups = sorted({c.key.group or "" for c in cells})
    pooled = {g: prepared.cells(g or None, control, "test") for g in groups}
    labels = kmeans(np.concatenate(list(pooled.values())), n_clusters)
    by_group, start = {}, 0
    for g, x in pooled.items():
        by_group[g] = labels[start:start + len(x)]
        start += len(x)
    return [np.array([f"k{label}" for label in by_group[c.key.group or ""]]) for c in cells]


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="metrics")


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}
table.metrics{border-collapse:collapse;font-size:12px}table.metrics td,table.metrics th{padding:2px 8px;
border-bottom:1px solid #ddd;text-align:right}pre{background:#f6f6f6;padding:.5em;font-size:11px;overflow:auto}
img{max-width:100%}details{margin:.5em 0}.scroll{max-height:420px;overflow:auto}"""


def render_report(run_dir: str | Path, out: str | Path | None = None, *, store: str | None = None,
                  detail: int = 3, features: int | list[str] = 4, n_clusters: int = 6,
                  cluster_key: str | None = None, max_heatmap: int = 60) -> Path:
    """Write one self-contained HTML report of a run (images embedded; also PNGs in RUN_DIR/plots/).

    Sections: run and data summary with the config; every map's metrics beside its baselines,
    largest effect first; transport cost per map and cluster; training curves; per-map detail
    (marginals of `features`: a count of most changed features or a list of names; embeddings) for
    the `detail` maps of largest and of smallest effect, the others listed. A search's directory (`perturbot tune --out`) gets its leaderboard and the validation
    curves of its best trials instead. Returns the HTML path (default RUN_DIR/report.html).
    """
    for name, value in (("detail", detail), ("features", features if isinstance(features, int) else 1),
                        ("clusters", n_clusters)):
        if value < 1:
            raise DataError(f"--{name} must be >= 1, got {value}")
    directory = RunDir(run_dir)
    if directory.exists() and directory.read_info().get("kind") == "tune":
        return _render_search(Path(run_dir), out, store)
    result = FitResult.load(run_dir, store)
    prepared = PreparedData.load(result.dir.data)
    if not result.dir.predictions.is_file():
        raise DataError(f"{run_dir} has no predictions.h5ad (the run did not finish any map)")
    predictions = ad.read_h5ad(result.dir.predictions)
    plots = result.run_dir / "plots"
    plots.mkdir(exist_ok=True)
    effects = effect_table(result)
    predicted_names = {i.split(":", 1)[0] for i in predictions.obs_names}
    keys = {k.name: k for k in prepared.maps if k.name in predicted_names}
    ranked = [name for name in effects["map"] if name in keys]
    chosen = ranked[:detail] + [n for n in ranked[-detail:] if n not in ranked[:detail]]
    shown = ranked[: max_heatmap // 2] + [n for n in ranked[-(max_heatmap // 2):] if n not in ranked[: max_heatmap // 2]]
    cells = [map_cells(prepared, predictions, keys[name]) for name in shown]
    costs = transport_costs(cells, _clusters(prepared, cells, n_clusters, cluster_key, result.config.dataset))
    config = result.config
    counts = pd.Series({split: sum(t.num_rows for (_, _, s), t in prepared.tables.items() if s == split)
                        for split in prepared.spec.splits})
    space = f"PCA latent, {prepared.dim} dims" if prepared.embedding is not None else f"{prepared.dim} features"
    parts = [
        f"<h1>perturbot run {html.escape(result.run_id)}</h1>",
        f"<p>solver <b>{html.escape(config.solver)}</b>, dataset {html.escape(str(config.dataset))}; "
        f"{len(prepared.maps)} maps ({len(ranked)} with predictions); training space: {space}; data space: "
        f"{len(prepared.features)} features; cells per split: "
        + ", ".join(f"{split} {n}" for split, n in counts.items()) + "</p>",
        "<details><summary>configuration</summary><pre>" + html.escape(yaml.safe_dump(config.to_dict(), sort_keys=False)) + "</pre></details>",
        "<h2>Metrics (test cells; mmd on each map's marker features), largest effect first</h2>",
        "<p>identity = the control cells unchanged (the effect size), observed = held-out perturbed cells "
        "(the floor), mean_shift and gaussian (Bures) = closed-form maps fitted on the same training cells. "
        "A neural map earns its place where model/gaussian &lt; 1.</p>",
        f'<div class="scroll">{_table(effects)}</div>',
        "<h2>Transport cost per map and cell cluster</h2>",
        "<p>" + (f"clusters: obs[{html.escape(cluster_key)}]" if cluster_key else
                 f"clusters: k-means (k={n_clusters}) on the test control cells in the training space")
        + (f"; showing the {len(shown)} maps of largest and smallest effect of {len(ranked)}" if len(shown) < len(ranked) else "")
        + "</p>",
        _image(_png(plot_costs(costs), plots / "transport_costs.png"), "transport costs"),
        "<h2>Training curves</h2>",
        _image(_png(plot_curves(result.metrics(), chosen), plots / "training_curves.png"), "training curves"),
        f"<h2>Per-map detail: the {detail} maps of largest and of smallest effect</h2>",
    ]
    by_name = {c.key.name: c for c in cells}
    for name in chosen:
        row = effects[effects["map"] == name].iloc[0]
        parts.append(f"<h3>{html.escape(name)}</h3><p>model mmd {row.get('model', np.nan):.4g}, identity "
                     f"{row.get('identity', np.nan):.4g}, gaussian {row.get('gaussian', np.nan):.4g}</p>")
        plotted = chosen_features(prepared.features, features, by_name[name].markers)
        parts.append(_image(_png(plot_marginals(by_name[name], prepared.features, plotted),
                                 plots / f"{_slug(name)}_marginals.png"), f"{name} marginals"))
        parts.append(_image(_png(plot_embedding(by_name[name]), plots / f"{_slug(name)}_embedding.png"),
                            f"{name} embedding"))
    others = [n for n in ranked if n not in chosen]
    if others:
        parts.append(f"<details><summary>{len(others)} other maps (metrics in the table above; plots with "
                     f"`engine.report` functions)</summary><p>{html.escape(', '.join(others))}</p></details>")
    return _write_page(result.run_id, parts, Path(out) if out is not None else result.run_dir / "report.html")


def _write_page(run_id: str, parts: list[str], path: Path) -> Path:
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>perturbot {html.escape(run_id)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page)
    return path


def _render_search(directory: Path, out: str | Path | None, store_url: str | None, shown: int = 10) -> Path:
    """A Tune search's report: its leaderboard and the validation curves of its best trials."""
    from engine.store import Store
    from tune.results import leaderboard

    info = RunDir(directory).read_info()
    with Store(store_url or info["store"]) as store:
        board, identity = leaderboard(store, info["run_id"])
        metrics = store.metrics(info["run_id"])
    plots = directory / "plots"
    plots.mkdir(exist_ok=True)
    best = list(board["trial_id"].head(shown))
    parts = [
        f"<h1>perturbot search {html.escape(info['run_id'])}</h1>",
        f"<p>{len(board)} trials; identity's mean validation mmd over the tuning maps {identity:.4g} "
        f"(ratio = best_mmd / identity). Best configuration: {html.escape(str(RunDir(directory).best_config))}</p>",
        "<h2>Leaderboard</h2>",
        f'<div class="scroll">{_table(board.astype({c: str for c in board.columns if board[c].dtype == object}))}</div>',
        f"<h2>Validation mmd against steps, the {len(best)} best trials</h2>",
        _image(_png(plot_trials(metrics, best), plots / "trials.png"), "trial curves"),
    ]
    return _write_page(info["run_id"], parts, Path(out) if out is not None else directory / "report.html")
