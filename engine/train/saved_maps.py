"""Trained maps on disk and back: state dicts plus solver name and options (no pickled classes),
and prediction of new cells through them, in chunks, with each map's context."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from engine.data import MapKey
from engine.options import to_plain
from engine.solvers import StackSolver, build_solver
from engine.storage import PathLike
from engine.train.checkpoint import load_checkpoint, save_checkpoint


def save_maps(path: PathLike, solver: StackSolver, keys: list[MapKey], contexts: torch.Tensor | None, run: dict) -> None:
    """A stack's trained maps: state dict, solver name and options, map names, contexts, run config.
    `keys` and `contexts` may hold more maps than the solver (a shared model's held-out contexts)."""
    save_checkpoint(
        path,
        {
            "solver": solver.name,
            "solver_params": to_plain(asdict(solver.config)),
            "dim": solver.dim,
            "n_maps": solver.n_maps,
            "context_dim": solver.context_dim,
            "maps": [k.name for k in keys],
            "contexts": None if contexts is None else contexts.cpu(),
            "state": {name: t.cpu() for name, t in solver.state_dict().items()},
            "run": run,
        },
    )


class SavedMaps:
    """A saved stack, rebuilt for prediction: solver, map names and their contexts."""

    def __init__(self, path: PathLike, device: torch.device | str = "cpu") -> None:
        payload = load_checkpoint(path, device)
        self.names: list[str] = list(payload["maps"])
        n_maps = payload.get("n_maps", len(self.names))  # a shared model's training contexts (may be fewer)
        self.solver = build_solver(payload["solver"], n_maps, payload["dim"], payload["solver_params"],
                                   payload.get("context_dim", 0))  # .get: maps saved before contexts
        self.solver.load_state_dict(payload["state"])
        self.solver.to(device)
        self.contexts: torch.Tensor | None = payload.get("contexts")
        self.device = torch.device(device)


def predict_cells(
    solver: StackSolver, x: list[np.ndarray], device: torch.device, contexts: torch.Tensor | None = None, chunk: int = 4096
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Transport each map's cells (x[k] for map k, with context contexts[k]) in chunks:
    [(cells, weights or None)] per map."""
    out: list[list[np.ndarray]] = [[] for _ in x]
    weights: list[list[np.ndarray]] = [[] for _ in x]
    context = None if contexts is None else contexts.to(device)
    longest = max(len(a) for a in x)
    for start in range(0, longest, chunk):
        parts = [a[start : start + chunk] for a in x]
        width = max(len(p) for p in parts)
        batch = np.zeros((len(x), max(width, 1), solver.dim), np.float32)
        for k, p in enumerate(parts):
            batch[k, : len(p)] = p
        moved = solver.transport(torch.from_numpy(batch).to(device), context)
        for k, p in enumerate(parts):
            out[k].append(moved.cells[k, : len(p)].detach().cpu().numpy())
            if moved.weights is not None:
                weights[k].append(moved.weights[k, : len(p)].detach().cpu().numpy())
    return [(np.concatenate(o), np.concatenate(w) if w else None) for o, w in zip(out, weights)]
