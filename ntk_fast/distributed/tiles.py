"""Where the tiles' numbers come from.

* :class:`TileSource` with ``cache_features=True`` and a structured model (FCNet, Sequential of Linear and
  elementwise layers): the per-layer features (A_l (t, p_l), D_l (t, k, q_l)) of a row block are computed
  once per rank (by the public :func:`ntk_fast.structured_features`) and kept, and each tile is one call of
  the fused op :func:`ntk_fast.gram`:

      trace / one output:  Theta[I, J] = sum_l (D_l[I] D_l[J]^T) o (A_l[I] A_l[J]^T)    (D_l flattened to (t, k q_l))
      full, k outputs:     rows are (point, output) pairs: A_l repeated k times, D_l as (t k, q_l), then
                           reshaped (t_I, k, t_J, k) -> (t_I, t_J, k, k)
      diagonal:            Theta(x_i, x_i) = sum_l |D_l[i]|^2 |A_l[i]|^2

  Memory: the features of the blocks this rank touches, n_touched sum_l (p_l + k q_l) numbers.
* otherwise (any module, or ``cache_features=False``): one call of the public :func:`ntk_fast.empirical_ntk`
  per tile, which recomputes the features (or Jacobians) of both blocks for every tile: about n / T extra
  feature passes (measured in bench/bench_distributed.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

Features = Tuple[List[torch.Tensor], List[torch.Tensor], int]


class TileSource:
    """Computes the tiles of one Gram: ``tile(rows_i, rows_j_or_None)`` -> numpy array."""

    def __init__(self, model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str, method: str,
                 precision: str, cache_features: bool):
        from ntk_fast.ntk.empirical import structured_input
        self.model, self.x1, self.x2, self.mode, self.method, self.precision = model, x1, x2, mode, method, precision
        self.cached = cache_features and method != "jacobian" and structured_input(model, x1)
        self._feats: Dict[Tuple[int, int, int], Features] = {}

    def _features(self, which: int, r0: int, r1: int) -> Features:
        from ntk_fast.ntk.empirical import structured_features
        key = (which, r0, r1)
        if key not in self._feats:
            x = self.x1 if which == 1 else self.x2
            with torch.no_grad():
                A, D, k = structured_features(self.model, x[r0:r1])
            self._feats[key] = ([a.detach() for a in A], [d.detach() for d in D], k)
        return self._feats[key]

    def tile(self, ri: Tuple[int, int], rj: Optional[Tuple[int, int]]) -> np.ndarray:
        """Theta between x1[ri] and the column block rj (of x2, or of x1 when x2 is None); rj None: the
        symmetric diagonal tile of ri (or the diagonal mode's entries of ri)."""
        if not self.cached:
            from ntk_fast.ntk.empirical import empirical_ntk
            xj = None if rj is None else (self.x1 if self.x2 is None else self.x2)[rj[0]:rj[1]]
            res = empirical_ntk(self.model, self.x1[ri[0]:ri[1]], xj, mode=self.mode, method=self.method,
                                precision=self.precision)
            return res.detach().to("cpu").numpy()
        A1, D1, k = self._features(1, *ri)
        if self.mode == "diagonal":
            return sum((d * d).sum(dim=(1, 2)) * (a * a).sum(dim=1) for a, d in zip(A1, D1)).cpu().numpy()
        A2, D2 = (None, None) if rj is None else self._features(1 if self.x2 is None else 2, *rj)[:2]
        return self._gram(A1, D1, A2, D2, k).cpu().numpy()

    def _gram(self, A1, D1, A2, D2, k: int) -> torch.Tensor:
        from ntk_fast.ops.gram import gram
        full = self.mode == "full" and k > 1
        n1 = A1[0].shape[0]
        n2 = n1 if A2 is None else A2[0].shape[0]
        if full:
            A1, D1 = [a.repeat_interleave(k, dim=0) for a in A1], [d.reshape(n1 * k, d.shape[2]) for d in D1]
            if A2 is not None:
                A2, D2 = [a.repeat_interleave(k, dim=0) for a in A2], [d.reshape(n2 * k, d.shape[2]) for d in D2]
        else:
            D1 = [d.reshape(n1, -1) for d in D1]
            D2 = None if D2 is None else [d.reshape(n2, -1) for d in D2]
        res = gram(A1, D1, A2, D2, precision=self.precision)
        return res.reshape(n1, k, n2, k).permute(0, 2, 1, 3) if full else res
