"""Which faces go into each training batch: a shuffled epoch, or class-balanced batches for triplet mining.

Both draw only from the run's ``torch.Generator``, whose state ``last.pt`` saves, so a resumed run draws
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import torch


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation cut into full batches (the ragged last batch is dropped: BN on tiny batches)."""
    order = torch.randperm(n, generator=generator)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]


def balanced_batches(
    labels: torch.Tensor, batch_size: int, per_class: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Class-balanced batches for triplet mining: P classes × K faces each.

    P = min(classes present, batch_size // per_class) random classes per batch and K = batch_size // P
    faces of each, so a batch holds ≥ ``per_class`` faces per class (every anchor has positives and
    negatives) and about ``batch_size`` faces. Each class is drawn without replacement from its own
    shuffled pool, reshuffled when used up, so rare classes (FER2013's disgust) repeat within an epoch
    (but not within a batch, unless the class has fewer than K faces).
    An epoch keeps the plain loop's number of steps, len(labels) // batch_size.
    """
    classes = labels.unique()
    p = min(len(classes), batch_size // per_class)
    if p < 2:
        raise ValueError(
            f"a balanced batch needs ≥ 2 classes of {per_class} faces: batch size {batch_size} holds "
            f"{batch_size // per_class} class(es) and the data has {len(classes)}"
        )
    k = batch_size // p
    pools = {int(c): (labels == c).nonzero().flatten() for c in classes}
    queues = {c: pool[torch.randperm(len(pool), generator=generator)] for c, pool in pools.items()}
    batches = []
    for _ in range(len(labels) // batch_size):
        chosen = classes[torch.randperm(len(classes), generator=generator)[:p]]
        parts = []
        for c in chosen.tolist():
            while len(queues[c]) < k:  # top up with a fresh shuffle of the class
                fresh = pools[c][torch.randperm(len(pools[c]), generator=generator)]
                if len(pools[c]) >= k:  # leftovers go first; skipping them keeps every face once per batch
                    fresh = fresh[~torch.isin(fresh, queues[c])]
                queues[c] = torch.cat([queues[c], fresh])
            parts.append(queues[c][:k])
            queues[c] = queues[c][k:]
        batches.append(torch.cat(parts))
    return batches
