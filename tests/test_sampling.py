"""Per-source balanced sampling (per_source_balanced)."""
from __future__ import annotations

import torch

from bloodcell_lib.training.sampling import per_source_balanced_order, per_source_balanced_weights


def _data():
    # source 0: 900 pictures (800 of class 0, 100 of class 1); source 1: 60 of class 0, 40 of class 2
    labels = torch.tensor([0] * 800 + [1] * 100 + [0] * 60 + [2] * 40)
    sources = torch.tensor([0] * 900 + [1] * 100)
    return labels, sources


def test_weights_give_each_source_and_each_class_within_it_an_equal_share():
    labels, sources = _data()
    weights = per_source_balanced_weights(labels, sources)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    for source in (0, 1):
        assert torch.isclose(weights[sources == source].sum(), torch.tensor(0.5, dtype=weights.dtype))
    assert torch.isclose(weights[:800].sum(), weights[800:900].sum())  # classes of source 0
    assert torch.isclose(weights[900:960].sum(), weights[960:].sum())


def test_order_is_seeded_balanced_and_shared_out_between_ranks():
    labels, sources = _data()
    order = per_source_balanced_order(labels, sources, epoch=1, seed=0)
    assert len(order) == len(labels) and torch.equal(order, per_source_balanced_order(labels, sources, 1, 0))
    assert not torch.equal(order, per_source_balanced_order(labels, sources, 2, 0))
    assert 0.4 < (sources[order] == 1).float().mean() < 0.6  # uniform draws would give 0.1
    ranks = [per_source_balanced_order(labels, sources, 1, 0, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.stack(ranks, 1).flatten(), order)
