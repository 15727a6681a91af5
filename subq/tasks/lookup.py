"""A key-value lookup whose labels a seeded program writes, for fine-tuning a pretrained
language model and scoring it by exact match (the PEFT recipe's second task).

One example, ``pairs`` records of distinct keys and then a query::

    Records: owl=amber; fox=teal; ...; yak=plum
    Lookup fox: teal

Every key and value is one token of the model's tokenizer (words of :data:`KEYS` and
:data:`VALUES` that it encodes, with their leading space, as a single token), and the ids are
assembled token by token, so every example has the same length and the answer is its last
token: the loss and the exact match read the logits of the position before it. Exact match of
a one-token answer is the accuracy of that prediction, which is also what greedy generation
would print first.

The examples of training step ``s`` are drawn from a generator seeded by ``(seed, s)``, the
held-out ones from a stream of their own (:func:`~subq.tasks.batches.seeded_generator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batches import batch_rows, seeded_generator

KEYS = ("owl", "fox", "yak", "cat", "dog", "eel", "ant", "bee", "cow", "elk", "emu", "gnu",
        "hen", "pig", "ram", "rat", "bat", "ape", "bear", "crab", "deer", "duck", "frog",
        "goat", "hawk", "lion", "mole", "moth", "mule", "newt", "seal", "swan", "toad", "wolf",
        "worm", "wren", "lamb", "mink", "puma", "tiger")
VALUES = ("red", "blue", "green", "pink", "gold", "teal", "gray", "plum", "rose", "jade",
          "amber", "ivory", "olive", "coral", "navy", "lime", "tan", "black", "white", "brown",
          "cyan", "silver", "violet", "orange", "purple", "yellow", "maroon", "beige", "mint",
          "peach", "ruby", "sand", "slate", "steel", "cream", "lemon", "copper", "bronze",
          "indigo", "scarlet")

def single_tokens(tokenizer, words: tuple[str, ...]) -> list[int]:
    """Ids of the ``words`` that ``tokenizer`` encodes (with a leading space) as one token."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    return ids


@dataclass
class LookupBatch:
    """``ids (B, T)`` whose last column is the answer."""

    ids: torch.Tensor

    @property
    def answers(self) -> torch.Tensor:
        return self.ids[:, -1]


class KeyValueLookup:
    """The examples of one tokenizer: ``batch(step, size, start, count)`` for training,
    :meth:`held_out` for evaluation."""

    def __init__(self, tokenizer, pairs: int = 8, seed: int = 0) -> None:
        self.keys = torch.tensor(single_tokens(tokenizer, KEYS))
        self.values = torch.tensor(single_tokens(tokenizer, VALUES))
        if pairs < 2:
            raise ValueError(f"pairs must be >= 2, got {pairs}")
        if len(self.keys) < pairs or len(self.values) < 2:
            raise ValueError(f"the tokenizer encodes {len(self.keys)} of the keys and "
                             f"{len(self.values)} of the values as single tokens; pairs={pairs} "
                             "needs that many keys and at least 2 values")
        self.pairs, self.seed = pairs, seed

        def encode(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer.encode(text, add_special_tokens=False))

        self.head, self.equals, self.separator = encode("Records:"), encode("="), encode(";")
        self.query_head, self.colon = encode("\nLookup"), encode(":")

    @property
    def length(self) -> int:
        """Tokens per example, the answer included."""
        return (len(self.head) + self.pairs * (2 + len(self.equals)) + (self.pairs - 1)
                * len(self.separator) + len(self.query_head) + 1 + len(self.colon) + 1)

    def example(self, generator: torch.Generator) -> torch.Tensor:
        """One example's ids ``(T,)``: records, query, answer last."""
        keys = self.keys[torch.randperm(len(self.keys), generator=generator)[:self.pairs]]
        values = self.values[torch.randint(len(self.values), (self.pairs,),
                                           generator=generator)]
        asked = int(torch.randint(self.pairs, (), generator=generator))
        parts = [self.head]
        for i in range(self.pairs):
            parts += [keys[i:i + 1], self.equals, values[i:i + 1]]
            if i < self.pairs - 1:
                parts.append(self.separator)
        parts += [self.query_head, keys[asked:asked + 1], self.colon, values[asked:asked + 1]]
        return torch.cat(parts)

    def batch(self, step: int, size: int, start: int = 0, count: int | None = None
              ) -> LookupBatch:
        """Rows ``[start, start + count)`` of training step ``step``'s ``size`` examples."""
        generator = seeded_generator(self.seed, "lookup", step)
        rows = [self.example(generator) for _ in range(size)]
        return LookupBatch(torch.stack(rows[batch_rows(size, start, count)]))

    def held_out(self, count: int) -> LookupBatch:
        """``count`` evaluation examples, the same for every run of the same tokenizer."""
        generator = seeded_generator(self.seed, "lookup held out")
        return LookupBatch(torch.stack([self.example(generator) for _ in range(count)]))
