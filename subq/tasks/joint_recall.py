"""Multi-query joint recall (``[hax]``, Zhan et al., NeurIPS 2025, Sec. 3; the generator of the
released ``scripts/create_dataset.py``), seeded and offline.

A sample is a random table ``matrix[a][b] ~ Uniform{0..n_value-1}`` over ``n_c`` contexts and
``n_k`` keys. The first half lists it: for each context ``a`` (random order) the token
``ctx(a)``, then for each key ``b`` (an independent random order) ``key(b) val(matrix[a][b])``.
After ``SEP`` the inquiry half lists it again, with new random orders. The loss applies at the
inquiry half's key tokens, whose next token is the value to recall (teacher forcing: the
values stay in the input). Answering needs both the current context and the key, which an
SSM's fixed state cannot hold for every pair (the paper's Prop. 3.1).

Token ids (``bias = 10``): value ``v`` -> ``10 + v``; key ``b`` -> ``10 + n_value + b``;
context ``a`` -> ``10 + n_value + max_n_key + a``; ``BOS = 1``, ``PAD = 3``, ``SEP = 4``. The
paper's defaults (``n_value = max_n_key = max_n_context = 16``) give values 10-25, keys 26-41,
contexts 42-57 in a vocabulary of 100, and sequences padded to
``2 * max_n_context * (2 * max_n_key + 1) + 2 = 1058`` tokens.

Worked example (``n_c = n_k = 2``, ``n_value = 16``, ``max_n_key = max_n_context = 2``, so keys
are 26, 27 and contexts 28, 29), table ``[[5, 9], [0, 14]]``::

    tokens : BOS ctx1 key0 v0  key1 v14 ctx0 key1 v9 key0 v5 SEP ctx0 key0 v5 key1 v9 ...
    ids    : 1   29   26   10  27   24  28   27   19 26   15 4   28   26   15 27   19 ...
    labels : -100 everywhere except at the inquiry keys: the key0 after SEP has label 15, ...

Layout: ``inputs = tokens[:-1]``, ``labels = tokens[1:]`` with ``-100`` (ignored) except where
the input token is an inquiry-half key. Accuracy is per sample (mean over its labelled
positions), then averaged over samples (the paper's metric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOS, PAD, SEP = 1, 3, 4
BIAS = 10
IGNORE = -100


@dataclass(frozen=True)
class RecallBatch:
    """Next-token data: ``inputs (N, T)`` token ids, ``labels (N, T)`` the target at each input
    position or ``-100`` where no loss applies. ``labels[:, t]`` is the token after
    ``inputs[:, t]`` wherever it is not ``-100``."""

    inputs: torch.Tensor
    labels: torch.Tensor

    @property
    def loss_mask(self) -> torch.Tensor:
        """``(N, T)`` bool, True where the loss applies."""
        return self.labels != IGNORE


def per_sample_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` accuracy of each sample: mean of ``argmax(logits) == label`` over its labelled
    positions (``logits (N, T, V)``, ``labels (N, T)``); NaN for a sample with no label."""
    mask = labels != IGNORE
    hits = (logits.argmax(-1) == labels) & mask
    return hits.sum(-1).double() / mask.sum(-1).double()


def vocab_size(n_value: int = 16, max_n_key: int = 16, max_n_context: int = 16) -> int:
    """The smallest vocabulary that holds every token id (the paper uses 100 >= 58)."""
    return BIAS + n_value + max_n_key + max_n_context


def joint_recall(num_samples: int, *, n_context: tuple[int, int] = (5, 16),
                 n_key: tuple[int, int] = (5, 16), n_value: int = 16,
                 max_n_context: int | None = None, max_n_key: int | None = None,
                 seed: int = 0) -> RecallBatch:
    """``num_samples`` joint-recall sequences, padded with ``PAD`` to a common length.

    ``n_context``/``n_key``: inclusive ranges; each sample draws ``(n_c, n_k)`` uniformly from
    them (the paper: ``[5, 16]^2``). ``max_n_context``/``max_n_key`` fix the token-id layout and
    the padded length (default: the ranges' upper ends). Same ``seed``, same batch.
    """
    (c_lo, c_hi), (k_lo, k_hi) = n_context, n_key
    max_n_context = c_hi if max_n_context is None else max_n_context
    max_n_key = k_hi if max_n_key is None else max_n_key
    if not 1 <= c_lo <= c_hi <= max_n_context:
        raise ValueError(f"n_context must satisfy 1 <= lo <= hi <= max_n_context, "
                         f"got {n_context} with max_n_context={max_n_context}")
    if not 1 <= k_lo <= k_hi <= max_n_key:
        raise ValueError(f"n_key must satisfy 1 <= lo <= hi <= max_n_key, "
                         f"got {n_key} with max_n_key={max_n_key}")
    if n_value < 1 or num_samples < 0:
        raise ValueError(f"n_value must be >= 1 and num_samples >= 0, got {n_value}, "
                         f"{num_samples}")
    gen = torch.Generator().manual_seed(seed)
    key_base, ctx_base = BIAS + n_value, BIAS + n_value + max_n_key
    length = 2 * max_n_context * (2 * max_n_key + 1) + 2
    tokens = torch.full((num_samples, length), PAD, dtype=torch.long)
    queried = torch.zeros(num_samples, length, dtype=torch.bool)
    for s in range(num_samples):
        n_c = int(torch.randint(c_lo, c_hi + 1, (), generator=gen))
        n_k = int(torch.randint(k_lo, k_hi + 1, (), generator=gen))
        table = torch.randint(0, n_value, (n_c, n_k), generator=gen)
        row = [BOS]
        for half in range(2):
            if half:
                row.append(SEP)
            for a in torch.randperm(n_c, generator=gen).tolist():
                row.append(ctx_base + a)
                for b in torch.randperm(n_k, generator=gen).tolist():
                    if half:
                        queried[s, len(row)] = True
                    row += [key_base + b, BIAS + int(table[a, b])]
        tokens[s, :len(row)] = torch.tensor(row)
    labels = torch.where(queried[:, :-1], tokens[:, 1:], IGNORE)
    return RecallBatch(tokens[:, :-1], labels)
