"""engine.ot.sinkhorn against POT, at NubOT's settings, stacked against one problem at a time."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from engine.ot.sinkhorn import NUBOT_EPS, NUBOT_REG_M, sinkhorn_potentials, transport_plan, unbalanced_sinkhorn

pytestmark = pytest.mark.usefixtures("one_thread")


def scaled_cost(n: int, m: int, seed: int, d: int = 2) -> np.ndarray:
    """Squared Euclidean cost between two random clouds (different spreads and a shift), / its max."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), 1.5 * rng.normal(size=(m, d)) + 0.5
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    return cost / cost.max()


def relative_error(plan: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(plan - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("eps, reg_m", [(NUBOT_EPS, NUBOT_REG_M), (0.05, 1.0), (0.01, 0.1), (0.0015, 0.05)])
def test_unbalanced_plan_matches_pot(eps, reg_m):
    """Random problems (n != m, non-uniform a and b): the plan is within 1e-3 (relative Frobenius)
    of POT's sinkhorn_unbalanced (float64, plain scaling, run to 1e-12), in float64 and float32.
    eps = 0.0015 (cost / eps spans 667 > KERNEL_SPAN) runs the log-domain iterations."""
    for seed in range(3):
        n, m = 60 + 10 * seed, 45
        cost = scaled_cost(n, m, seed)
        rng = np.random.default_rng(100 + seed)
        a, b = rng.uniform(0.5, 1.5, n) / n, rng.uniform(0.5, 1.5, m) / m
        reference = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, eps, reg_m, numItermax=100_000, stopThr=1e-12)
        for dtype in (torch.float64, torch.float32):
            plan = unbalanced_sinkhorn(torch.tensor(cost, dtype=dtype)[None], eps, reg_m,
                                       torch.tensor(a, dtype=dtype)[None], torch.tensor(b, dtype=dtype)[None],
                                       tol=1e-7 if dtype == torch.float64 else 1e-5, max_iterations=10_000)
            assert relative_error(plan[0].double().numpy(), reference) < 1e-3, (seed, dtype)


def test_uniform_marginals_match_pot_and_the_defaults_are_nubots():
    """Uniform marginals by default; eps 0.005 and reg_m 0.05 by default; within 1e-3 of POT."""
    cost = scaled_cost(80, 70, 7)
    a, b = np.full(80, 1 / 80), np.full(70, 1 / 70)
    reference = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, 0.005, 0.05, numItermax=100_000, stopThr=1e-12)
    plan = unbalanced_sinkhorn(torch.tensor(cost, dtype=torch.float32)[None])
    assert relative_error(plan[0].double().numpy(), reference) < 1e-3


def test_finite_at_small_eps_where_the_kernel_underflows():
    """eps = 0.005 on a cost up to 1 (kernel down to exp(-200), 0 in float32) and eps = 1e-3:
    finite potentials and plan, positive row sums, in float32."""
    cost = torch.tensor(scaled_cost(200, 150, 3), dtype=torch.float32)[None]
    assert float(torch.exp(-cost / NUBOT_EPS).min()) == 0.0  # the plain kernel underflows
    for eps in (NUBOT_EPS, 1e-3):
        potentials = sinkhorn_potentials(cost, eps, NUBOT_REG_M)
        plan = transport_plan(cost, potentials, eps)
        assert bool(torch.isfinite(potentials.f).all() and torch.isfinite(potentials.g).all())
        assert bool(torch.isfinite(plan).all()) and bool((plan.sum(2) > 0).all())


@pytest.mark.parametrize("eps", [NUBOT_EPS, 0.001])
def test_stacked_problems_equal_separate_solves(eps):
    """K = 4 problems of the same shape in one stack (masses 1 to 1000 against 1: they converge
    after different numbers of iterations) give each problem's separate solve: potentials and plan
    (1e-10), iterations; on the kernel (eps 0.005) and in the log domain (eps 0.001)."""
    costs = torch.stack([torch.tensor(scaled_cost(50, 40, s)) * scale for s, scale in enumerate((1.0, 0.3, 0.6, 0.1))])
    a = torch.full((4, 50), 1 / 50, dtype=torch.float64) * torch.tensor([[1.0], [10.0], [100.0], [1000.0]], dtype=torch.float64)
    stacked = sinkhorn_potentials(costs, eps, NUBOT_REG_M, a)
    plans = transport_plan(costs, stacked, eps, a)
    assert len(set(stacked.iterations.tolist())) > 1  # the early stop is per problem
    for k in range(4):
        alone = sinkhorn_potentials(costs[k : k + 1], eps, NUBOT_REG_M, a[k : k + 1])
        assert int(alone.iterations) == int(stacked.iterations[k])
        torch.testing.assert_close(alone.f[0], stacked.f[k], rtol=0, atol=1e-10)
        torch.testing.assert_close(transport_plan(costs[k : k + 1], alone, eps, a[k : k + 1])[0], plans[k], rtol=0,
                                   atol=1e-10)


def test_balanced_limit_has_the_marginals():
    """reg_m = inf is balanced Sinkhorn: the plan's marginals are a and b (to 1e-6) and it matches
    POT's log-domain Sinkhorn."""
    cost = scaled_cost(40, 30, 5)
    a, b = np.full(40, 1 / 40), np.full(30, 1 / 30)
    potentials = sinkhorn_potentials(torch.tensor(cost)[None], 0.05, math.inf, tol=1e-10, max_iterations=10_000)
    plan = transport_plan(torch.tensor(cost)[None], potentials, 0.05)[0].numpy()
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-6)
    reference = ot.sinkhorn(a, b, cost, 0.05, method="sinkhorn_log", numItermax=10_000, stopThr=1e-12)
    assert relative_error(plan, reference) < 1e-3


def test_a_nan_problem_does_not_change_its_stack():
    """A problem with a NaN cost (a diverged map) comes out NaN; the others of its stack equal their
    separate solves (the kernel / log-domain choice is made per problem)."""
    costs = torch.stack([torch.tensor(scaled_cost(30, 20, s)) for s in range(3)])
    costs[1, 0, 0] = float("nan")
    stacked = sinkhorn_potentials(costs, NUBOT_EPS, NUBOT_REG_M)
    assert bool(torch.isnan(stacked.f[1]).any())
    for k in (0, 2):
        alone = sinkhorn_potentials(costs[k : k + 1], NUBOT_EPS, NUBOT_REG_M)
        torch.testing.assert_close(alone.f[0], stacked.f[k], rtol=0, atol=1e-12)
