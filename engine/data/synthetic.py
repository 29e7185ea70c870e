"""Synthetic data whose true maps are known: a perturbation data set (fast tests, the demo) and
KnownMaps, mixtures pushed through known maps far from affine (solver ground truth, benchmarks).

Per group, control cells come from a mixture of 3 isotropic Gaussians (std 0.5, means ~ N(0, 2^2 I)).
Perturbation p in group g pushes fresh mixture samples through

    T(x) = x + b + a W^T tanh(W x),   a > 0,

the gradient of the convex potential 0.5 |x|^2 + b.x + a sum_i log cosh((W x)_i), hence the
W2-optimal (Brenier) map from the source it is applied to. With ``growth`` the perturbed cells are
drawn with changed cluster proportions pi_k * r_k (sum_k pi_k r_k = 1): clusters grow or die, the
unbalanced setting of NubOT (Lübeck et al. 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

CONTROL = "control"
N_CLUSTERS = 3
CLUSTER_STD = 0.5


def _push(x: np.ndarray, shift: np.ndarray, scale: float, weight: np.ndarray) -> np.ndarray:
    """T(x) = x + b + a W^T tanh(W x), row-wise on x [n, d]."""
    return x + shift + scale * np.tanh(x @ weight.T) @ weight


def make_synthetic(
    n_perturbations: int = 3,
    n_groups: int = 2,
    dim: int = 8,
    n_cells: int = 500,
    growth: bool = False,
    seed: int = 0,
) -> ad.AnnData:
    """AnnData with ``n_cells`` cells per (group, condition) (n_groups >= 1), float32 X [cells, dim].

    obs: ``condition`` ("control", "pert0", ...), ``group`` ("g0", ...), ``cluster`` (mixture
    component); var names "f0", ...; ``uns["synthetic"]`` holds the json-safe ground truth: per group
    the cluster means and proportions, per map "g/p" the shift b, scale a, weight W, the perturbed
    cluster proportions and the growth factors r.
    """
    rng = np.random.default_rng(seed)
    uniform = np.full(N_CLUSTERS, 1.0 / N_CLUSTERS)
    truth: dict = {"seed": seed, "growth": growth, "cluster_std": CLUSTER_STD, "groups": {}, "maps": {}}
    blocks, conditions, groups, clusters = [], [], [], []
    for g in range(n_groups):
        group = f"g{g}"
        means = rng.normal(0.0, 2.0, size=(N_CLUSTERS, dim))
        truth["groups"][group] = {"means": means.tolist(), "proportions": uniform.tolist()}
        populations: list[tuple[str, np.ndarray, dict | None]] = [(CONTROL, uniform, None)]
        for p in range(n_perturbations):
            params = {
                "shift": rng.normal(0.0, 1.0, dim),
                "scale": float(rng.uniform(0.5, 1.5)),
                "weight": rng.normal(0.0, 1.0 / np.sqrt(dim), (dim, dim)),
            }
            factors = 1.0 + rng.uniform(0.4, 0.8) * rng.permutation([-1.0, 0.0, 1.0]) if growth else np.ones(N_CLUSTERS)
            populations.append((f"pert{p}", uniform * factors, params))
            truth["maps"].setdefault(group, {})[f"pert{p}"] = {  # nested: "/" is a path in h5
                **{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in params.items()},
                "proportions": (uniform * factors).tolist(),
                "growth": factors.tolist(),
            }
        for label, proportions, params in populations:
            cluster = rng.choice(N_CLUSTERS, size=n_cells, p=proportions)
            x = means[cluster] + CLUSTER_STD * rng.standard_normal((n_cells, dim))
            blocks.append(x if params is None else _push(x, **params))
            conditions += [label] * n_cells
            groups += [group] * n_cells
            clusters.append(cluster)
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(conditions),
            "group": pd.Categorical(groups),
            "cluster": np.concatenate(clusters),
        },
        index=[f"cell{i}" for i in range(len(conditions))],
    )
    var = pd.DataFrame(index=[f"f{j}" for j in range(dim)])
    adata = ad.AnnData(X=np.concatenate(blocks).astype(np.float32), obs=obs, var=var)
    adata.uns["synthetic"] = truth
    return adata


def synthetic_map(adata: ad.AnnData, name: str, x: np.ndarray | Sequence) -> np.ndarray:
    """Apply the true map ``name`` ("g0/pert1") of a ``make_synthetic`` AnnData to cells x [n, dim]."""
    group, perturbation = name.split("/")
    params = adata.uns["synthetic"]["maps"][group][perturbation]
    shift, weight = np.asarray(params["shift"]), np.asarray(params["weight"])
    return _push(np.asarray(x, dtype=np.float64), shift, float(params["scale"]), weight).astype(np.float32)


@dataclass
class KnownMaps:
    """A mixture source and K known W2 maps far from affine (ground truth for solver benchmarks).

    Source: `clusters` isotropic Gaussians (std 1, means ~ N(0, 2^2 I)), equal weights. Map k is the
    gradient of the convex potential (a sum of smoothed squared hinges, each cutting the source
    through one of its own cells o_j along a unit normal w_j, j = 1..d):

        phi_k(x) = |x|^2 / 2 + <b_k, x> + (a tau^2 / 2) sum_j softplus(u_j)^2,  u_j = <w_j, x - o_j> / tau
        T_k(x)   = x + b_k + a tau sum_j softplus(u_j) sigmoid(u_j) w_j

    so T_k stretches the source across each hyperplane u_j = 0 (the Jacobian grows by up to ~a w_j w_j^T
    on its far side): an affine (Bures) map leaves 1.5-18% of the target variance unexplained at
    a = 6 (measured 1.6-18% at d = 2, 8, 32, 64, seed 0), a good W2 solver well under 1%.
    """

    means: np.ndarray  # [clusters, d]
    shifts: np.ndarray  # b [K, d]
    normals: np.ndarray  # w [K, d, d], unit rows
    offsets: np.ndarray  # <w_j, o_j> [K, d]
    strength: float  # a
    tau: float

    @property
    def n_maps(self) -> int:
        return len(self.shifts)

    def sample_source(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n source cells [n, d] (float32)."""
        cluster = rng.integers(0, len(self.means), n)
        return (self.means[cluster] + rng.standard_normal((n, self.means.shape[1]))).astype(np.float32)

    def transport(self, k: int, x: np.ndarray) -> np.ndarray:
        """T_k(x) for cells x [n, d] (float32)."""
        x = np.asarray(x, np.float64)
        u = (x @ self.normals[k].T - self.offsets[k]) / self.tau
        push = np.logaddexp(0.0, u) / (1.0 + np.exp(-u))  # softplus(u) sigmoid(u)
        return (x + self.shifts[k] + self.strength * self.tau * push @ self.normals[k]).astype(np.float32)


def make_known_maps(dim: int, n_maps: int = 3, clusters: int = 4, strength: float = 6.0, tau: float = 0.3,
                    seed: int = 0) -> KnownMaps:
    """K known maps of one mixture source in dimension `dim` (see KnownMaps), seeded."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 2.0, (clusters, dim))
    draft = KnownMaps(means, np.zeros((0, dim)), np.zeros((0, dim, dim)), np.zeros((0, dim)), strength, tau)
    normals = rng.normal(size=(n_maps, dim, dim))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    anchors = np.stack([draft.sample_source(dim, rng) for _ in range(n_maps)])  # o_j: source cells
    offsets = np.einsum("kjd,kjd->kj", normals, anchors)
    return KnownMaps(means, rng.normal(0.0, 1.0, (n_maps, dim)), normals, offsets, strength, tau)


@dataclass(frozen=True)
class ClusterSetting:
    """One setting of NubOT's synthetic experiment: cluster proportions in source (p) and target (q)."""

    source: tuple[float, float, float]
    target: tuple[float, float, float]

    @property
    def growth(self) -> np.ndarray:
        """The true scaling factor q / p of each cluster."""
        return np.asarray(self.target) / np.asarray(self.source)


THIRD = 1.0 / 3.0
CLUSTER_SETTINGS: dict[str, ClusterSetting] = {  # Lübeck et al. 2022, table 1 (settings a, b, c)
    "a": ClusterSetting((THIRD, THIRD, THIRD), (0.45, 0.45, 0.10)),
    "b": ClusterSetting((THIRD, THIRD, THIRD), (0.70, 0.20, 0.10)),
    "c": ClusterSetting((0.45, 0.45, 0.10), (0.10, 0.45, 0.45)),
}
CLUSTER_CENTRES = np.array([[0.0, 0.0], [5.0, 0.0], [2.5, 4.33]])  # an equilateral triangle of side 5
CLUSTER_SHIFT = np.array([3.0, 2.0])  # longer than half a side: x -> x is not the right matching
CLUSTER_SPREAD = 0.5


def make_clusters(n_cells: int = 4000, settings: Sequence[str] = ("a", "b", "c"), seed: int = 0) -> ad.AnnData:
    """NubOT's synthetic experiment (Lübeck et al. 2022, 4.1 and table 1), 2-D, one group per setting.

    Group s (a setting of CLUSTER_SETTINGS) has ``n_cells`` control cells drawn from three Gaussians
    (centres CLUSTER_CENTRES, std CLUSTER_SPREAD) with proportions p, and ``n_cells`` perturbed cells
    from the same clusters with proportions q, every cell shifted by CLUSTER_SHIFT. The unbalanced map
    is x -> x + shift with weight q_k / p_k on cluster k. obs: ``condition`` (control | shifted),
    ``group`` (the setting), ``cluster``.
    """
    rng = np.random.default_rng(seed)
    blocks, conditions, groups, clusters = [], [], [], []
    for name in settings:
        setting = CLUSTER_SETTINGS[name]
        for label, proportions, shift in (("control", setting.source, 0.0), ("shifted", setting.target, CLUSTER_SHIFT)):
            cluster = rng.choice(3, size=n_cells, p=np.asarray(proportions) / sum(proportions))
            blocks.append(CLUSTER_CENTRES[cluster] + CLUSTER_SPREAD * rng.standard_normal((n_cells, 2)) + shift)
            conditions += [label] * n_cells
            groups += [name] * n_cells
            clusters.append(cluster)
    obs = pd.DataFrame({"condition": pd.Categorical(conditions), "group": pd.Categorical(groups),
                        "cluster": np.concatenate(clusters)}, index=[f"cell{i}" for i in range(len(conditions))])
    return ad.AnnData(X=np.concatenate(blocks).astype(np.float32), obs=obs, var=pd.DataFrame(index=["x", "y"]))


def make_dose_response(
    doses: Sequence[float] = (10, 100, 1000, 10000),
    dim: int = 5,
    n_cells: int = 600,
    shift: float = 1.0,
    seed: int = 0,
) -> ad.AnnData:
    """A dose response (CondOT's setting, Bunne et al. 2022): control cells ~ N(0, Sigma); at dose D
    the cells are N(shift * log10(D) * e, Sigma), e a fixed unit direction, so the effect grows
    with log-dose. obs["dose"]: "0" for the control, else the dose as written (e.g. "1000")."""
    rng = np.random.default_rng(seed)
    root = np.eye(dim) + 0.2 * rng.normal(size=(dim, dim))
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    labels = ["0", *(f"{d:g}" for d in doses)]
    means = [np.zeros(dim), *(shift * np.log10(d) * direction for d in doses)]
    x = np.concatenate([mean + rng.normal(size=(n_cells, dim)) @ root for mean in means]).astype(np.float32)
    obs = pd.DataFrame({"dose": np.repeat(labels, n_cells)}, index=[f"cell{i}" for i in range(len(x))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(dim)]))


def make_combinations(
    parts: Sequence[str] = ("A", "B", "C"), dim: int = 5, n_cells: int = 600, size: float = 2.0, seed: int = 0
) -> ad.AnnData:
    """Combinations with additive effects: control cells ~ N(0, Sigma); perturbation P shifts them by
    size * e_P (orthonormal directions), a pair "P+Q" by size * (e_P + e_Q). obs["condition"]:
    "control", every part and every pair of parts (e.g. "A+B")."""
    rng = np.random.default_rng(seed)
    root = np.eye(dim) + 0.2 * rng.normal(size=(dim, dim))
    directions = dict(zip(parts, np.linalg.qr(rng.normal(size=(dim, len(parts))))[0].T))
    labels = [CONTROL, *parts, *(f"{p}+{q}" for i, p in enumerate(parts) for q in parts[i + 1 :])]
    means = [np.zeros(dim) if label == CONTROL else size * sum(directions[p] for p in label.split("+")) for label in labels]
    x = np.concatenate([mean + rng.normal(size=(n_cells, dim)) @ root for mean in means]).astype(np.float32)
    obs = pd.DataFrame({"condition": np.repeat(labels, n_cells)}, index=[f"cell{i}" for i in range(len(x))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(dim)]))
