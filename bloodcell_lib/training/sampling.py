"""Per-source balanced sampling for multi-source training (config ``per_source_balanced``).

PBC alone has more pictures than the other labs together: drawn uniformly, a model learns
mostly what a CellaVision picture looks like. Here every training source is drawn equally
often and, within a source, every class equally often (WeightedRandomSampler's semantics:
``len(labels)`` draws with replacement), from the epoch's seeded generator, so every rank
of a distributed run computes the same global order and takes its strided share.
"""
from __future__ import annotations

import torch

from bloodcell_lib.core import distributed as D


def per_source_balanced_weights(labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Each sample's weight: 1 / (sources x classes of its source x its (source, class) count)."""
    strata = sources * (int(labels.max()) + 1) + labels
    counts = torch.bincount(strata).double()
    classes_per_source = torch.bincount(torch.unique(strata) // (int(labels.max()) + 1)).double()
    n_sources = (classes_per_source > 0).sum()
    return 1.0 / (n_sources * classes_per_source[sources] * counts[strata])


def per_source_balanced_order(labels: torch.Tensor, sources: torch.Tensor, epoch: int, seed: int, *,
                              rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's sample order for ``epoch``: ``len(labels)`` draws by per_source_balanced_weights."""
    if len(labels) == 0:
        return torch.zeros(0, dtype=torch.long)
    generator = D.epoch_generator(seed, epoch, stream=0)
    order = torch.multinomial(per_source_balanced_weights(labels, sources), len(labels), replacement=True,
                              generator=generator)
    return D.rank_share(order, rank, world_size, pad=True)
