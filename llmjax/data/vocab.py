"""The special token ids every objective relies on, reserved in every llmjax tokenizer."""

from __future__ import annotations

import dataclasses

# Fixed ids at the bottom of the vocabulary (T5's pad=0, eos=1, unk=2 order, then the rest).
PAD_ID, EOS_ID, UNK_ID, BOS_ID, CLS_ID, SEP_ID, MASK_ID, NLU_ID, NLG_ID, S2S_ID = range(10)
# UL2's mode (paradigm) tokens, named as in the released UL2 checkpoints and U-PaLM (Tay et al. 2022, 2022b):
# [NLU] marks R-denoiser (regular span corruption) examples, [NLG] X-denoiser (extreme) ones, [S2S] S-denoiser
# (prefix LM) ones; a mixture objective prepends one to the inputs (llmjax.objectives.mixture).
MODE_PIECES = ("[NLU]", "[NLG]", "[S2S]")
RESERVED_PIECES = ("<pad>", "</s>", "<unk>", "<s>", "[CLS]", "[SEP]", "[MASK]", *MODE_PIECES)


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

    def mode(self, piece: str) -> int:
        """The id of mode token `piece` ('[NLU]', '[NLG]' or '[S2S]')."""
        if piece not in MODE_PIECES:
            raise ValueError(f"unknown mode token {piece!r}; the reserved mode tokens are {', '.join(MODE_PIECES)}")
        return RESERVED_PIECES.index(piece)

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
