"""Multi-query associative recall (MQAR) with zoology's semantics (``[zoology]``, Arora et al.
2023, "Zoology: measuring and improving recall in efficient language models"), seeded and
offline.

Each sequence starts with ``num_kv_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...``: keys are
distinct ids from the lower half of the vocabulary ``[1, V/2)``, values distinct ids from the
upper half ``[V/2, V)``. The rest of the sequence holds each key once more as a query, at a
gap after the context drawn from a power law (``p(g) ~ g^(a-1)``, ``a = power_a``: short gaps
are likelier), each query followed by its value; every other slot is filler (``0``, or a
random token when ``random_non_queries``). Labels are ``-100`` except at the query positions,
whose label is the value that follows.

Worked example (``vocab_size=8``, ``input_seq_len=12``, ``num_kv_pairs=2``, no random filler):
keys 3, 1 with values 5, 6, queries at gaps 1 and 0::

    sequence : 3 5 1 6 | 1 6 3 5 0 0 0 0 0
    inputs   : 3 5 1 6   1 6 3 5 0 0 0 0          (sequence[:-1], 12 tokens)
    labels   : . . . .   6 . 5 . . . . .          (sequence[1:] at the queries; . = -100)
"""

from __future__ import annotations

import torch

from .joint_recall import IGNORE, RecallBatch


def mqar(num_samples: int, *, vocab_size: int = 8192, input_seq_len: int = 64,
         num_kv_pairs: int = 4, power_a: float = 0.01, random_non_queries: bool = True,
         seed: int = 0) -> RecallBatch:
    """``num_samples`` MQAR sequences of ``input_seq_len`` tokens (inputs and labels
    ``(N, input_seq_len)``). Same ``seed``, same batch."""
    context = 2 * num_kv_pairs
    space = (input_seq_len - context) // 2
    if num_kv_pairs < 1 or space < num_kv_pairs:
        raise ValueError(f"input_seq_len={input_seq_len} must be >= 4 * num_kv_pairs "
                         f"(num_kv_pairs={num_kv_pairs}, >= 1) to hold the context and queries")
    half = vocab_size // 2
    if half - 1 < num_kv_pairs or vocab_size - half < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} too small for {num_kv_pairs} distinct keys "
                         "and values")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    gen = torch.Generator().manual_seed(seed)
    n = num_samples
    keys = torch.rand(n, half - 1, generator=gen).argsort(-1)[:, :num_kv_pairs] + 1
    values = torch.rand(n, vocab_size - half, generator=gen).argsort(-1)[:, :num_kv_pairs] + half
    seq = torch.zeros(n, input_seq_len + 1, dtype=torch.long)
    seq[:, 0:context:2], seq[:, 1:context:2] = keys, values

    gaps = torch.arange(1, space + 1, dtype=torch.float64)
    probs = (power_a * gaps.pow(power_a - 1)).expand(n, -1)
    slot = torch.multinomial(probs, num_kv_pairs, replacement=False, generator=gen)
    query_pos = context + 2 * slot                                   # (N, num_kv_pairs)
    seq.scatter_(1, query_pos, keys)
    seq.scatter_(1, query_pos + 1, values)
    labels = torch.full_like(seq, IGNORE)
    labels.scatter_(1, query_pos + 1, values)

    inputs = seq[:, :-1].clone()
    if random_non_queries:
        filler = torch.randint(0, vocab_size, inputs.shape, generator=gen)
        inputs = torch.where(inputs == 0, filler, inputs)
    return RecallBatch(inputs, labels[:, 1:])
