"""Latent spaces of the data space, with their inverse: PCA ("pca:K") and an autoencoder ("ae:K").

Both are fitted on train cells only (the autoencoder keeps its best state on valid cells), are
saved with the prepared data, and clamp decoded values at the data's floor when the data space is
non-negative (log counts): a decoded log-expression is never below 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from engine.data.spec import DataError, parse_embed
from engine.storage import StoragePath, to_bytes

Folder = Path | StoragePath  # the prepared data's folder (any storage location) or the local cache

PCA_FILE = "pca.npz"
AE_FILE = "autoencoder.pt"
AE_HIDDEN = (512, 512)  # CellOT's scRNA-seq autoencoder (scGen-style): hidden [512, 512], latent 50
AE_STEPS = 3000  # Adam steps (lr 1e-3, batch 256); the state with the lowest valid reconstruction is kept
AE_EVAL_EVERY = 100


def data_floor(x_train: np.ndarray) -> float | None:
    """0.0 when every train value is >= 0 (counts, log counts: decoded cells are clamped there), else None."""
    return 0.0 if float(x_train.min()) >= 0.0 else None


def _clamped(x: np.ndarray, floor: float | None) -> np.ndarray:
    return x if floor is None else np.maximum(x, np.float32(floor))


@dataclass(eq=False)
class PCAEmbedding:
    """PCA: z = (x - mu) C^T and x_hat = max(z C + mu, floor), with C [k, d] orthonormal rows, mu [d]."""

    mean: np.ndarray
    components: np.ndarray
    floor: float | None = None

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent coordinates float32 [n, k] of data-space cells [n, d]."""
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Data-space cells float32 [n, d] of latent points [n, k] (exact on the PCA subspace above the floor)."""
        return _clamped(np.ascontiguousarray(z @ self.components + self.mean, dtype=np.float32), self.floor)

    def save(self, directory: Folder) -> None:
        floor = np.array([] if self.floor is None else [self.floor], np.float32)
        (directory / PCA_FILE).write_bytes(
            to_bytes(lambda f: np.savez(f, mean=self.mean, components=self.components, floor=floor)))

    @classmethod
    def load(cls, directory: Folder) -> PCAEmbedding:
        with np.load(io.BytesIO((directory / PCA_FILE).read_bytes())) as saved:
            floor = float(saved["floor"][0]) if len(saved["floor"]) else None
            return cls(saved["mean"], saved["components"], floor)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PCAEmbedding)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.components, other.components)
            and self.floor == other.floor
        )


def fit_pca(x: np.ndarray, k: int, floor: float | None = None) -> PCAEmbedding:
    """Top-k principal axes of the rows of x (Pearson 1901), requires k <= min(n, d).

    With Xc = X - mean: the top-k eigenvectors C^T of Xc^T Xc when d <= n, else C = U^T Xc / s from
    the top-k eigenpairs (U, s^2) of Xc Xc^T (the right singular vectors of Xc either way). Only k
    eigenpairs are computed (LAPACK syevr, float64). Signs are fixed so that the largest |entry| of
    each axis is positive, which makes the result deterministic.
    """
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    centered = x - mean
    n, d = centered.shape
    small = centered.T @ centered if d <= n else centered @ centered.T
    m = small.shape[0]
    values, vectors = scipy.linalg.eigh(small.astype(np.float64), subset_by_index=[m - k, m - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    if d <= n:
        components = vectors.T
    else:
        components = (vectors.T @ centered.astype(np.float64)) / np.sqrt(np.maximum(values, 1e-12))[:, None]
    pivot = np.abs(components).argmax(axis=1)
    components = components * np.sign(components[np.arange(k), pivot])[:, None]
    return PCAEmbedding(mean, np.ascontiguousarray(components, dtype=np.float32), floor)


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with LeakyReLU(0.2) between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class AutoencoderEmbedding(nn.Module):
    """Autoencoder latent (scGen / CellOT's scRNA-seq set-up): z = enc(x), x_hat = max(dec(z), floor),
    encoder d -> 512 -> 512 -> k and decoder k -> 512 -> 512 -> d, LeakyReLU, trained on the mean
    squared reconstruction error of the train cells (``fit_autoencoder``)."""

    def __init__(self, input_dim: int, latent: int, hidden: tuple[int, ...] = AE_HIDDEN,
                 floor: float | None = None) -> None:
        super().__init__()
        self.input_dim, self.latent, self.hidden, self.floor = input_dim, latent, tuple(hidden), floor
        self.encoder = _mlp([input_dim, *hidden, latent])
        self.decoder = _mlp([latent, *reversed(hidden), input_dim])

    @property
    def dim(self) -> int:
        return self.latent

    @torch.no_grad()
    def _run(self, part: nn.Module, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        rows = [part(torch.from_numpy(np.array(x[i:i + chunk], np.float32))).numpy()
                for i in range(0, len(x), chunk)]
        return np.concatenate(rows) if rows else np.zeros((0, part[-1].out_features), np.float32)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent codes float32 [n, k] of data-space cells [n, d]."""
        return self._run(self.encoder, x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Data-space cells float32 [n, d] of latent points [n, k] (clamped at the data's floor)."""
        return _clamped(self._run(self.decoder, z), self.floor)

    def save(self, directory: Folder) -> None:
        payload = {"input_dim": self.input_dim, "latent": self.latent, "hidden": list(self.hidden),
                   "floor": self.floor, "state": self.state_dict()}
        (directory / AE_FILE).write_bytes(to_bytes(lambda f: torch.save(payload, f)))

    @classmethod
    def load(cls, directory: Folder) -> AutoencoderEmbedding:
        saved = torch.load(io.BytesIO((directory / AE_FILE).read_bytes()), map_location="cpu", weights_only=True)
        model = cls(saved["input_dim"], saved["latent"], tuple(saved["hidden"]), saved["floor"])
        model.load_state_dict(saved["state"])
        return model.eval()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AutoencoderEmbedding) or (self.input_dim, self.latent, self.hidden, self.floor) != (
            other.input_dim, other.latent, other.hidden, other.floor
        ):
            return False
        theirs = other.state_dict()
        return all(torch.equal(v, theirs[k]) for k, v in self.state_dict().items())

    __hash__ = nn.Module.__hash__


def cache_dir() -> Path:
    """Where fitted autoencoders are kept: $PERTURBOT_CACHE, else ~/.cache/perturbot."""
    return Path(os.environ.get("PERTURBOT_CACHE", Path.home() / ".cache" / "perturbot"))


def fit_autoencoder(x_train: np.ndarray, x_valid: np.ndarray, latent: int, seed: int = 0,
                    steps: int | None = None, floor: float | None = None) -> AutoencoderEmbedding:
    """Train (or load from the cache, keyed by the sha256 of the cells and the settings) an autoencoder:
    Adam lr 1e-3, batches of 256 train cells, mean squared error; the state with the lowest valid
    reconstruction error (every 100 steps) is kept; ``steps`` defaults to AE_STEPS. Deterministic for
    a seed on one device."""
    steps = AE_STEPS if steps is None else steps
    settings = {"latent": latent, "hidden": list(AE_HIDDEN), "steps": steps, "seed": seed, "floor": floor}
    digest = hashlib.sha256(json.dumps(settings).encode())
    for x in (x_train, x_valid):
        digest.update(np.ascontiguousarray(x, np.float32).tobytes())
    cached = cache_dir() / "autoencoders" / digest.hexdigest()[:32]
    if (cached / AE_FILE).is_file():
        return AutoencoderEmbedding.load(cached)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoencoderEmbedding(x_train.shape[1], latent, AE_HIDDEN, floor)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, valid = torch.from_numpy(np.asarray(x_train, np.float32)), torch.from_numpy(np.asarray(x_valid, np.float32))
    best, best_state = float("inf"), None
    for step in range(1, steps + 1):
        batch = train[torch.randint(len(train), (min(256, len(train)),), generator=generator)]
        loss = ((model.decoder(model.encoder(batch)) - batch) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % AE_EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                error = float(((model.decoder(model.encoder(valid)) - valid) ** 2).mean())
            if error < best:
                best, best_state = error, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    cached.mkdir(parents=True, exist_ok=True)
    model.save(cached)
    return model


Embedding = PCAEmbedding | AutoencoderEmbedding


def fit_embedding(embed: str | None, x_train: np.ndarray, x_valid: np.ndarray, seed: int) -> Embedding | None:
    """The embedding an embed spec asks for, fitted on train cells (the autoencoder also reads valid cells)."""
    parsed = parse_embed(embed)
    if parsed is None:
        return None
    kind, k = parsed
    n, d = x_train.shape
    if kind == "pca" and k > min(n, d):
        raise DataError(f"embed {embed!r} asks for {k} components; the data have {d} features, {n} train cells")
    if kind == "ae" and k >= d:
        raise DataError(f"embed {embed!r} asks for a {k}-dim latent; the data have {d} features")
    floor = data_floor(x_train)
    return fit_pca(x_train, k, floor) if kind == "pca" else fit_autoencoder(x_train, x_valid, k, seed, floor=floor)


def load_embedding(directory: Folder) -> Embedding | None:
    """The embedding saved beside prepared data (``save``), or None."""
    if (directory / PCA_FILE).is_file():
        return PCAEmbedding.load(directory)
    if (directory / AE_FILE).is_file():
        return AutoencoderEmbedding.load(directory)
    return None
