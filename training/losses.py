"""Losses beyond cross-entropy."""

from __future__ import annotations

import torch


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """N × N Euclidean distances; the clamp keeps sqrt's gradient finite at zero distance."""
    sq = embeddings.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T
    return d2.clamp_min(1e-12).sqrt()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Triplet loss with in-batch hard mining (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017).

    For every anchor: its farthest same-label sample (hardest positive) and its nearest other-label
    sample (hardest negative); loss = mean over anchors of max(0, d(a, p) - d(a, n) + margin).
    Anchors without a positive or without a negative in the batch are left out; a batch with none
    left gives a zero that still belongs to the graph. Batches should hold several faces per class
    (a class-balanced sampler) for most anchors to count.
    """
    dist = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(1)
    valid = positive.any(1) & negative.any(1)
    if not valid.any():
        return embeddings.sum() * 0.0
    losses = torch.relu(hardest_positive - hardest_negative + margin)
    return losses[valid].mean()
