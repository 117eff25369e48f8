"""The special token ids every objective relies on, reserved in every llmjax tokenizer."""

from __future__ import annotations

import dataclasses

# Fixed ids at the bottom of the vocabulary (T5's pad=0, eos=1, unk=2 order, then the rest).
PAD_ID, EOS_ID, UNK_ID, BOS_ID, CLS_ID, SEP_ID, MASK_ID = range(7)
RESERVED_PIECES = ("<pad>", "</s>", "<unk>", "<s>", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Special ids of a vocabulary of `vocab_size` pieces with `num_sentinels` T5 sentinels at the top:
    sentinel i (`<extra_id_i>`) has id vocab_size - 1 - i, as in T5."""

    vocab_size: int
    num_sentinels: int = 100
    pad: int = PAD_ID
    eos: int = EOS_ID
    unk: int = UNK_ID
    bos: int = BOS_ID
    cls: int = CLS_ID
    sep: int = SEP_ID
    mask: int = MASK_ID

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range: this vocabulary has {self.num_sentinels} sentinels")
        return self.vocab_size - 1 - i

    @property
    def first_sentinel(self) -> int:
        """The lowest sentinel id; every id >= this is a sentinel."""
        return self.vocab_size - self.num_sentinels

    @property
    def special(self) -> tuple[int, ...]:
        """Ids that are never masked or corrupted: the reserved pieces and the sentinels."""
        return tuple(range(len(RESERVED_PIECES))) + tuple(range(self.first_sentinel, self.vocab_size))

    @property
    def num_regular(self) -> int:
        return self.vocab_size - len(RESERVED_PIECES) - self.num_sentinels
