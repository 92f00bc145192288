"""Memorisation check: is a synthetic tile a near-copy of a real training tile?

For each synthetic tile, the nearest real training tile in a feature space (and in pixel space).
The threshold is calibrated on the real set itself: the ``quantile`` (default 1 %) of real tiles'
leave-one-out nearest-neighbour distances, i.e. closer than almost any two distinct real tiles
are to each other. The share of synthetic tiles under it is reported, with the closest pairs.
"""

from __future__ import annotations

import torch


def nearest(query: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False,
            chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, the nearest row of ``ref`` for each row of ``query``."""
    dists, idx = [], []
    q, r = query.double(), ref.double()
    for s in range(0, q.shape[0], chunk):
        d = torch.cdist(q[s:s + chunk], r)                   # chunk x N
        if exclude_self:
            rows = torch.arange(s, min(s + chunk, q.shape[0]))
            d[rows - s, rows] = float("inf")
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def calibrate(train: torch.Tensor, quantile: float = 0.01) -> float:
    """The ``quantile`` of real-vs-real leave-one-out nearest-neighbour distances."""
    d, _ = nearest(train, train, exclude_self=True)
    return float(torch.quantile(d, quantile))


def memorisation(fake: torch.Tensor, train: torch.Tensor, quantile: float = 0.01,
                 top: int = 8) -> dict:
    """Nearest-training-tile distances of every synthetic tile and the flagged share."""
    threshold = calibrate(train, quantile)
    d, idx = nearest(fake, train)
    flagged = d <= threshold
    order = torch.argsort(d)[:top]
    return {"threshold": threshold, "quantile": quantile, "share_flagged": float(flagged.float().mean()),
            "n_flagged": int(flagged.sum()), "distances": d.tolist(), "nearest_index": idx.tolist(),
            "flagged": flagged.tolist(), "closest": [(int(i), int(idx[i]), float(d[i])) for i in order]}
