"""Losses beyond cross-entropy: the triplet loss (stn_resnet10_triplet) and the semi-supervised GAN's (sgan)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def sgan_discriminator_loss(
    real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor, label_smoothing: float, unsupervised_weight: float
) -> torch.Tensor:
    """Salimans et al. (2016): supervised CE on the K real classes + the real-vs-fake loss.

    ``real``/``fake`` are the K+1 logits (last = fake). p(real | x) = Σ_k<K exp(l_k) / Σ_all exp(l), so
    -log p(real) = lse(all) - lse(real classes) and -log p(fake) = lse(all) - l_fake, in log-sum-exp
    form for stability. All training faces are labelled here, so the same batch serves as the
    "unlabelled" real batch; with an unlabelled set it would take that one's place.
    """
    k = real.shape[1] - 1
    supervised = F.cross_entropy(real[:, :k], y, label_smoothing=label_smoothing)
    real_is_real = (torch.logsumexp(real, 1) - torch.logsumexp(real[:, :k], 1)).mean()
    fake_is_fake = (torch.logsumexp(fake, 1) - fake[:, k]).mean()
    return supervised + unsupervised_weight * (real_is_real + fake_is_fake)


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """Squared distance between the batch means of the discriminator's features (Salimans et al., 2016)."""
    return (real_features.detach().mean(0) - fake_features.mean(0)).pow(2).sum()
