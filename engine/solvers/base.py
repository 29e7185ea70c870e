"""The solver contract: K maps (or one shared model over K contexts) trained by the device loop.

A solver reads like its paper's algorithm box: networks, losses, one training step. Sampling,
devices, evaluation cadence, best-state selection, divergence and checkpoints live in
`engine.train`, which drives every solver through this interface only:

    solver = SolverClass(n_maps, dim, config, context_dim)   # on CPU; config = Config dataclass
    solver.initialize(data, seeds)                      # per-map seeded draws, then data moments
    solver.to(device)
    plan = solver.plan(config, steps)                   # named phases (classmethod)
    solver.start_training(plan)                         # optimizers and LR schedulers
    logs = solver.train_step(data, step, phase)         # per-map scalars [K] (or [1] if shared)
    solver.transport(x, context) -> Transport(cells, weights)   # x [K, n, d], context [K, c]

- Phases (`Plan`): e.g. W1OT trains its potential, then its step size. Only phases with
  `selects_best` may pick a map's best state (validation MMD, every `eval_every` steps and at every
  phase end); the final state is the best selectable one. Schedulers are the solver's: it steps
  them in `train_step`; the loop saves and restores them with the optimizers, so a resume in the
  middle of a phase continues exactly.
- Contexts: `StackData.contexts` [K, c] holds a context per map (a multi-hot of the perturbation's
  parts, then the group; `engine.data`), and populations may carry one per cell. Validation,
  evaluation and prediction pass the per-map contexts to `transport`; CondOT reads them, the others
  ignore them.
- Stacked or shared: a stacked solver (`shared = False`) has the map axis first on every
  parameter and buffer, so maps are kept, restored and frozen by mask independently. A shared
  solver (`shared = True`, one model over all contexts) is one selection unit: its best state is
  chosen on the mean validation MMD over its contexts and it diverges as a whole.
- Data parallel (shared solvers): several workers may train one model, each on a disjoint share
  of the global batch (`StackData(share=(rank, workers))`). The Ray layer then sets
  `solver.average` (engine.solvers.optim.Average): the solver passes it to `adam_step`, which
  averages the gradients over the workers before each step, and averages its step's logs with it,
  so every worker holds the same model and logs the global batch's losses. None on one worker.
- Options: `Config` is a dataclass of the solver's defaults, the published constants unless the
  solver says otherwise; `published` lists the Config values that reproduce the paper where the
  defaults differ (`--published`); `make_config` parses plain values (YAML, `--set`) with type
  checks (engine.options).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from engine.options import DataError, parse_options
from engine.solvers.optim import Average
from engine.train.stack_data import StackData

State = dict[str, torch.Tensor]


@dataclass
class Transport:
    """Predicted cells [K, n, d] and, for unbalanced solvers, a weight per cell [K, n]."""

    cells: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class Phase:
    """A named stretch of training steps; `selects_best`: its states may become a map's best state."""

    name: str
    steps: int
    selects_best: bool = True


@dataclass(frozen=True)
class Plan:
    """The phases of a training run, in order; step s (0-based) belongs to the phase covering it.

    A plan that selects ends in a selecting phase (the final state is the best selectable one, so
    a trailing phase that does not select would be trained and thrown away)."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names) or any(p.steps < 0 for p in self.phases):
            raise ValueError(f"phases need distinct names and steps >= 0: {self.phases}")
        if self.selects and not self.phases[-1].selects_best:
            raise ValueError(f"a plan that selects must end in a selecting phase: {self.phases}")

    def describe(self) -> list[tuple[str, int, bool]]:
        """(name, steps, selects_best) per phase: what a checkpoint records."""
        return [(p.name, p.steps, p.selects_best) for p in self.phases]

    def continues(self, saved: list[tuple[str, int, bool]], step: int) -> bool:
        """Can a checkpoint of plan `saved` at `step` resume under this plan? The same plan, or the
        same one with a longer or shorter last phase that still covers `step`."""
        now = self.describe()
        if saved == now:
            return True
        same_last = bool(saved) and bool(now) and (saved[-1][0], saved[-1][2]) == (now[-1][0], now[-1][2])
        return saved[:-1] == now[:-1] and same_last and step <= self.total

    @property
    def total(self) -> int:
        return sum(p.steps for p in self.phases)

    def spans(self) -> list[tuple[Phase, int, int]]:
        """(phase, first step, end step) of each phase."""
        out, start = [], 0
        for phase in self.phases:
            out.append((phase, start, start + phase.steps))
            start += phase.steps
        return out

    def phase_at(self, step: int) -> Phase:
        for phase, start, end in self.spans():
            if start <= step < end:
                return phase
        raise IndexError(f"step {step} is outside the plan ({self.total} steps)")

    def ends(self) -> set[int]:
        return {end for _, _, end in self.spans()}

    def selects_at(self, done: int) -> bool:
        """May the state after `done` steps become a best state? Yes inside or at either end of a
        selecting phase (its start state included: the state a phase begins from is one of its own)."""
        return any(p.selects_best and start <= done <= end for p, start, end in self.spans())

    @property
    def selects(self) -> bool:
        return any(p.selects_best for p in self.phases)


class StackSolver(nn.Module):
    """Base class: subclasses set `name`, `Config` (a dataclass of their defaults) and the steps."""

    name: ClassVar[str]
    Config: ClassVar[type]
    trainable: ClassVar[bool] = True
    shared: ClassVar[bool] = False  # one model over all contexts (no map axis on its parameters)
    published_steps: ClassVar[int] = 0
    published: ClassVar[dict[str, Any]] = {}  # Config values of the paper where our defaults differ

    def __init__(self, n_maps: int, dim: int, config: Any, context_dim: int = 0) -> None:
        super().__init__()
        self.n_maps, self.dim, self.config, self.context_dim = n_maps, dim, config, context_dim
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.average: Average | None = None  # data-parallel training: the mean over workers (module docstring)

    # -- to implement -------------------------------------------------------------------------
    def init_map(self, k: int, generator: torch.Generator) -> None:
        """Draw map k's random weights from its own generator (shared solvers: k = 0 only)."""

    def init_from_data(self, data: StackData) -> None:
        """Data-dependent initialisation (moments of each map's training cells)."""

    @classmethod
    def plan(cls, config: Any, steps: int) -> Plan:
        """The training phases for `config` and a budget of `steps` outer steps (default: one phase,
        `train`; a solver may take explicit per-phase counts from its config instead)."""
        return Plan((Phase("train", steps),) if cls.trainable else ())

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """LR schedulers over self.optimizers (stepped by the solver in train_step); default none."""
        return {}

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no training step")

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """One line on what the solver does (its class docstring's first line; CLI help)."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0].rstrip(".")

    @property
    def n_units(self) -> int:
        """Selection units: one per map when stacked, one for a shared model."""
        return 1 if self.shared else self.n_maps

    def initialize(self, data: StackData, seeds: Sequence[int]) -> None:
        """Seeded per-map init (independent of the stack) followed by the data-dependent part."""
        for k, seed in enumerate(seeds[: self.n_units]):
            self.init_map(k, torch.Generator().manual_seed(int(seed)))
        self.init_from_data(data)

    def start_training(self, plan: Plan) -> None:
        """Fresh optimizers and schedulers for `plan` (the solver must be on its device)."""
        self.optimizers = self.build_optimizers()
        self.schedulers = self.build_schedulers(plan)

    def snapshot(self) -> State:
        """A detached copy of every map's state (parameters and buffers)."""
        return {name: t.detach().clone() for name, t in self.state_dict().items()}

    def _unit_mask(self, mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """mask [n_units] shaped to broadcast over `tensor` (map axis first, or the whole tensor)."""
        if self.shared:
            return mask.reshape([1] * tensor.dim())
        return mask.view(-1, *([1] * (tensor.dim() - 1)))

    def blend(self, keep: State, take: State, mask: torch.Tensor) -> State:
        """A state with the units selected by mask [n_units] from `take`, the others from `keep`."""
        return {name: torch.where(self._unit_mask(mask, t), take[name], t) for name, t in keep.items()}

    @torch.no_grad()
    def restore_maps(self, snapshot: State, mask: torch.Tensor) -> None:
        """Set the units selected by mask [n_units] (bool) back to their values in snapshot."""
        for name, tensor in self.state_dict(keep_vars=True).items():
            tensor.copy_(torch.where(self._unit_mask(mask, tensor), snapshot[name], tensor))

    def training_state(self) -> dict[str, Any]:
        """Optimizer and scheduler state dicts (for checkpoints)."""
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore optimizers and schedulers; DataError for a checkpoint of other solver settings."""
        saved = (set(state["optimizers"]), set(state["schedulers"]),
                 [len(o["param_groups"]) for o in state["optimizers"].values()])
        wanted = (set(self.optimizers), set(self.schedulers), [len(o.param_groups) for o in self.optimizers.values()])
        if saved != wanted:
            raise DataError("the checkpoint was written with other solver settings (optimizers, schedules); "
                            "start a new run directory or restore that run's config")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])


def make_config(config_class: type, params: dict[str, Any] | None) -> Any:
    """A solver's Config from plain values (YAML / CLI), typed and checked (engine.options)."""
    return parse_options(config_class, params, "solver")
