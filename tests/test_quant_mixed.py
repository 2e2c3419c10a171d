"""Mixed precision: the knapsack is optimal (vs brute force), never over budget, and refuses budgets below the floor."""

from __future__ import annotations

import itertools
import random

import pytest

from llmopt.errors import LlmoptError
from llmopt.quant.mixed import knapsack


def _brute(costs, losses, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[p] for c, p in zip(costs, pick))
        if cost <= budget:
            loss = sum(l[p] for l, p in zip(losses, pick))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, pick)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    costs = [sorted(rng.randint(1, 60) for _ in range(k)) for _ in range(n)]
    # losses fall with size, like quantization error with bits, but not always strictly (real data is noisy)
    losses = [sorted((rng.random() * 10 for _ in range(k)), reverse=True) for _ in range(n)]
    floor = sum(min(c) for c in costs)
    budget = rng.randint(floor, sum(max(c) for c in costs) + 5)
    pick = knapsack(costs, losses, budget)
    assert sum(c[p] for c, p in zip(costs, pick)) <= budget
    best_loss, _ = _brute(costs, losses, budget)
    assert sum(l[p] for l, p in zip(losses, pick)) == pytest.approx(best_loss, abs=1e-9)


def test_knapsack_large_instance_within_budget_and_near_optimal():
    rng = random.Random(7)
    sizes = [rng.randint(10_000, 5_000_000) for _ in range(300)]
    bits = [2.25, 2.5, 3.25, 3.5, 4.25, 8.0]
    costs = [[int(s * b / 8) for b in bits] for s in sizes]
    losses = [[s * 4.0 ** -b * rng.uniform(0.5, 2) for b in bits] for s in sizes]
    budget = int(sum(sizes) * 3.2 / 8)
    pick = knapsack(costs, losses, budget)
    used = sum(c[p] for c, p in zip(costs, pick))
    assert used <= budget
    assert used >= 0.995 * budget  # the DP's rounding leaves at most a sliver of the budget unused
    uniform = [min(range(len(bits)), key=lambda j: abs(bits[j] - 3.25))] * len(sizes)
    assert sum(l[p] for l, p in zip(losses, pick)) <= sum(l[p] for l, p in zip(losses, uniform))


def test_knapsack_below_floor_is_an_error():
    with pytest.raises(LlmoptError, match="below the floor"):
        knapsack([[10, 20], [10, 20]], [[1, 0], [1, 0]], 19)


def test_knapsack_exact_floor():
    assert knapsack([[10, 20], [10, 20]], [[1, 0], [1, 0]], 20) == [0, 0]
