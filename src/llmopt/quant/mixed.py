"""Mixed precision to a byte budget: per-tensor sensitivity and a multiple-choice knapsack.

Every quantizable tensor ``t`` is quantized with every candidate format ``o`` (bits x group x sym); its size
``bytes[t][o]`` is exact and its cost ``loss[t][o]`` is measured:

- ``fisher`` (real models): ``1/2 sum F * dW**2`` with ``F`` the diagonal empirical Fisher on calibration text, a
  second-order estimate of the loss increase when that tensor alone is quantized (validated against the measured
  loss increase by ``bench/quant_sensitivity.py``);
- ``output``: ``sum_j E[x_j**2] sum_i dW_ij**2``, the expected squared output error of the layer (imatrix);
- ``mse``: ``sum dW**2`` (synthetic weights, where no calibration exists).

``knapsack`` then picks one format per tensor minimizing the total loss with total bytes <= budget, by dynamic
programming over the budget in ``resolution`` units. Sizes are rounded up to whole units, so the result never
exceeds the budget; with unit 1 (small instances) it is the exact optimum. A greedy pass then spends the bytes the
rounding left unused on the upgrades with the best loss reduction per byte.
"""

from __future__ import annotations

import numpy as np
import torch

from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor
from llmopt.quant.quantizers import dequantized_rows

RESOLUTION = 20000  # budget units of the DP: the optimality gap is at most one unit per tensor


def knapsack(costs: list[list[int]], losses: list[list[float]], budget: int,
             resolution: int = RESOLUTION) -> list[int]:
    """Index of the chosen option per item: min sum of losses s.t. sum of costs <= budget (multiple-choice)."""
    floor = sum(min(c) for c in costs)
    if floor > budget:
        raise LlmoptError(f"budget {budget} bytes is below the floor {floor} bytes (every tensor at its smallest format)")
    for res in (resolution, 4 * resolution, 16 * resolution):  # finer units when rounding up breaks the floor
        unit = max(1, -(-budget // res))
        cap = budget // unit
        units = [[-(-c // unit) for c in row] for row in costs]
        if sum(min(u) for u in units) <= cap:
            break
    else:
        raise LlmoptError(f"budget {budget} bytes is within rounding of the floor {floor} bytes; raise it slightly")
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((len(costs), cap + 1), dtype=np.int16)
    for i, (row_u, row_l) in enumerate(zip(units, losses)):
        new = np.full(cap + 1, inf)
        for o, (u, loss) in enumerate(zip(row_u, row_l)):
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[:cap + 1 - u] + loss
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = o
        dp = new
    c = int(np.argmin(dp))
    if not np.isfinite(dp[c]):
        raise LlmoptError(f"budget {budget} bytes: no assignment of formats fits")
    picks = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        picks[i] = int(choice[i, c])
        c -= units[i][picks[i]]
    return _fill(costs, losses, budget, picks)


def _fill(costs, losses, budget, picks) -> list[int]:
    """Spend what the DP's rounded-up sizes left over: repeatedly take the upgrade with the best loss drop per byte."""
    left = budget - sum(c[p] for c, p in zip(costs, picks))
    while True:
        best, gain = None, 0.0
        for i, (row_c, row_l) in enumerate(zip(costs, losses)):
            for o, (c, loss) in enumerate(zip(row_c, row_l)):
                extra = c - row_c[picks[i]]
                drop = row_l[picks[i]] - loss
                if 0 <= extra <= left and drop > 0 and drop / max(extra, 1) > gain:
                    best, gain = (i, o, extra), drop / max(extra, 1)
        if best is None:
            return picks
        i, o, extra = best
        picks[i] = o
        left -= extra


def tensor_loss(w: torch.Tensor, qt: QuantizedTensor, kind: str, fisher: torch.Tensor | None = None,
                importance: torch.Tensor | None = None) -> float:
    """The cost of replacing ``w`` by ``qt`` under sensitivity ``kind`` (fisher | output | mse), in row chunks."""
    floor = 0.01 * float(fisher.float().mean()) if kind == "fisher" else 0.0
    total = 0.0
    for r0, r1, deq in dequantized_rows(qt):
        err = (w[r0:r1].float() - deq).square_()
        if kind == "fisher":
            # Rows never seen in calibration (embedding rows of absent tokens) get a small floor, not zero weight.
            total += 0.5 * float((err * fisher[r0:r1].float().clamp_min(floor)).sum())
        elif kind == "output":
            total += float((err.sum(0) * importance.float()).sum())
        else:
            total += float(err.sum())
    return total
