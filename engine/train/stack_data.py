"""The cells of a stack of K maps, moved to the device once, and minibatches drawn on device.

Each population (source train, target train) is one [N, d] tensor holding the K maps' cells
back to back, with per-map offsets and counts. A minibatch is an index draw: map k takes b indices
uniformly (with replacement) from its own cells and a gather gives [K, b, d].

Contexts: `contexts` [K, c] holds one context vector per map (what validation, evaluation and
prediction pass to `transport`); a population may also carry one per cell ([N, c], e.g. a dose per
cell), which `source_sample` / `target_sample` gather with the cells.

Draws are counter based: index = hash(map seed, stream, draw counter, slot) mod n_k. A map's
draws therefore depend only on its own seed and the number of draws so far, never on which other
maps share its stack, which is what makes stacked training equal one-at-a-time training; the
counter is the whole sampler state a checkpoint needs. Data-parallel training (`share` = (rank,
workers)): a worker draws the slots rank, rank + workers, ... of the global batch, so the workers'
minibatches are disjoint and together are exactly the one-worker minibatch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from engine.ot.gaussian import gaussian_moments

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64
SOURCE, TARGET = 1, 2  # draw streams


def map_seed(seed: int, map_name: str) -> int:
    """A stable 31-bit seed for one map from the run seed and the map's name."""
    digest = hashlib.sha256(f"{seed}:{map_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (bijective on [0, 2^32)); works on int64 tensors and Python ints."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def batch_share(share: tuple[int, int], batch_size: int) -> float:
    """The fraction of every minibatch that worker `share` = (rank, workers) draws (its slots
    rank, rank + workers, ... of batch_size)."""
    rank, workers = share
    return len(range(rank, batch_size, workers)) / batch_size


class Batch(NamedTuple):
    """A minibatch: cells [K, b, d] and their contexts [K, b, c] (None without contexts)."""

    cells: torch.Tensor
    context: torch.Tensor | None


@dataclass
class Population:
    """K maps' cells concatenated: cells [N, d], offsets [K], counts [K] (int64, on device), and
    optionally a context per cell [N, c]."""

    cells: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    context: torch.Tensor | None = None

    @classmethod
    def from_arrays(
        cls, arrays: list[np.ndarray], device: torch.device, contexts: list[np.ndarray] | None = None
    ) -> "Population":
        counts = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
        offsets = torch.cumsum(counts, 0) - counts
        cells = torch.from_numpy(np.concatenate(arrays).astype(np.float32, copy=False))
        context = None
        if contexts is not None:
            if [len(c) for c in contexts] != [len(a) for a in arrays]:
                raise ValueError("per-cell contexts must have one row per cell of each map")
            context = torch.from_numpy(np.concatenate(contexts).astype(np.float32, copy=False)).to(device)
        return cls(cells.to(device), offsets.to(device), counts.to(device), context)

    def of_map(self, k: int) -> torch.Tensor:
        start, count = int(self.offsets[k]), int(self.counts[k])
        return self.cells[start : start + count]


@dataclass
class Padded:
    """Per-map cell sets padded to a common length: cells [K, m, d], weights [K, m] (0 = padding)."""

    cells: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], device: torch.device) -> "Padded":
        m, d = max(len(a) for a in arrays), arrays[0].shape[1]
        cells = np.zeros((len(arrays), m, d), np.float32)
        weights = np.zeros((len(arrays), m), np.float32)
        for k, a in enumerate(arrays):
            cells[k, : len(a)] = a
            weights[k, : len(a)] = 1.0
        return cls(torch.from_numpy(cells).to(device), torch.from_numpy(weights).to(device))


class StackData:
    """Training and validation cells of K maps on one device, with on-device minibatch draws."""

    def __init__(
        self,
        source: list[np.ndarray],
        target: list[np.ndarray],
        valid_source: list[np.ndarray],
        valid_target: list[np.ndarray],
        seeds: list[int],
        batch_size: int,
        device: torch.device | str = "cpu",
        contexts: np.ndarray | None = None,
        source_contexts: list[np.ndarray] | None = None,
        target_contexts: list[np.ndarray] | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        device = torch.device(device)
        rank, workers = share
        if not 0 <= rank < workers <= batch_size:
            raise ValueError(f"share {share}: rank in [0, workers) and at most batch_size={batch_size} workers")
        self.source = Population.from_arrays(source, device, source_contexts)
        self.target = Population.from_arrays(target, device, target_contexts)
        self.valid_source = Padded.from_arrays(valid_source, device)
        self.valid_target = Padded.from_arrays(valid_target, device)
        if contexts is not None and len(contexts) != len(seeds):
            raise ValueError(f"contexts has {len(contexts)} rows for {len(seeds)} maps")
        self.contexts = None if contexts is None else torch.as_tensor(np.asarray(contexts, np.float32), device=device)
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device).unsqueeze(1)
        self.slots = torch.arange(rank, batch_size, workers, dtype=torch.int64, device=device).unsqueeze(0)
        self.n_maps, self.dim, self.device = len(seeds), self.source.cells.shape[1], device
        self.draws = 0

    def _draw(self, population: Population, stream: int) -> torch.Tensor:
        """Indices [K, b] into population.cells of a fresh minibatch (advances the draw counter)."""
        key = mix32((stream << 24) ^ (self.draws & 0xFFFFFF))
        self.draws += 1
        per_map = mix32(self.seeds ^ key)
        return mix32(per_map ^ self.slots) % population.counts.unsqueeze(1) + population.offsets.unsqueeze(1)

    def _with_context(self, population: Population, index: torch.Tensor) -> Batch:
        if population.context is not None:
            context = population.context[index]
        elif self.contexts is not None:
            context = self.contexts.unsqueeze(1).expand(-1, index.shape[1], -1)
        else:
            context = None
        return Batch(population.cells[index], context)

    def source_sample(self) -> Batch:
        """A fresh source (control) minibatch with its contexts."""
        return self._with_context(self.source, self._draw(self.source, SOURCE))

    def target_sample(self) -> Batch:
        """A fresh target (perturbed) minibatch with its contexts."""
        return self._with_context(self.target, self._draw(self.target, TARGET))

    def source_batch(self) -> torch.Tensor:
        """A fresh source (control) minibatch [K, b, d] (no context gathered)."""
        return self.source.cells[self._draw(self.source, SOURCE)]

    def target_batch(self) -> torch.Tensor:
        """A fresh target (perturbed) minibatch [K, b, d] (no context gathered)."""
        return self.target.cells[self._draw(self.target, TARGET)]

    def moments(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-map Gaussian fits of the training cells (float64): mean_s, cov_s, mean_t, cov_t."""
        fits = []
        for population in (self.source, self.target):
            means, covs = zip(*(gaussian_moments(population.of_map(k).double(), ridge) for k in range(self.n_maps)))
            fits += [torch.stack(means), torch.stack(covs)]
        return fits[0], fits[1], fits[2], fits[3]
