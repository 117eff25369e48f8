"""SentencePiece tokenizers with llmjax's reserved ids: train one from texts, or load and check one.

Text choices, made so that `decode(encode(text)) == text` for code and docs as well as prose:
- normalization 'identity' (NFKC would fold 'ﬁ' to 'fi', and nmt_nfkc turns tabs/newlines into spaces),
  remove_extra_whitespaces=False (keeps indentation and double spaces), whitespace-only pieces allowed
  (one piece for an indent);
- newlines are ordinary characters: training sentences keep them, so pieces like '):\\n' exist;
- byte_fallback=True: a character outside the vocabulary becomes its UTF-8 bytes, never '<unk>';
- split_digits=True: numbers are spelled digit by digit, as in Llama/PaLM.
[CLS], [SEP], [MASK], UL2's mode tokens ([NLU], [NLG], [S2S]) and the sentinels are CONTROL pieces: `encode`
never produces them from text (a literal "[MASK]" in a corpus must not become the mask id); `parse_special=True`
opts in.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from llmjax import storage
from llmjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, RESERVED_PIECES, UNK_ID, SpecialIds

MODEL_TYPES = ("unigram", "bpe")
# Bump when `train_tokenizer` changes what it makes from the same inputs (part of the data fingerprint).
TRAINER_VERSION = 2  # 2: UL2's mode tokens [NLU], [NLG], [S2S] reserved at ids 7-9
SENTINEL_PIECE = "<extra_id_{}>"
NUM_BYTE_PIECES = 256
MIN_LEARNED_PIECES = 64  # below this a vocabulary is all bytes and single characters
# A training "sentence" is a paragraph (or a piece of a long one); SentencePiece skips longer ones.
_MAX_SENTENCE_CHARS = 2000
_MAX_SENTENCE_BYTES = 4 * _MAX_SENTENCE_CHARS
WORD_START = "\u2581"  # '▁', SentencePiece's marker for a preceding space

_Piece = model_pb2.ModelProto.SentencePiece


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or used; the message names the file or argument."""


def min_vocab_size(num_sentinels: int) -> int:
    """The smallest vocab_size `train_tokenizer` accepts: reserved ids, byte pieces, sentinels, some pieces."""
    return len(RESERVED_PIECES) + NUM_BYTE_PIECES + num_sentinels + MIN_LEARNED_PIECES


def sentinel_piece(i: int) -> str:
    return SENTINEL_PIECE.format(i)


class Tokenizer:
    """A loaded SentencePiece model whose reserved ids are checked (see `llmjax.data.vocab`)."""

    def __init__(self, model_bytes: bytes, *, num_sentinels: int | None = None, source: str = "<in memory>"):
        """`num_sentinels` None: take as many `<extra_id_i>` as the top of the vocabulary holds."""
        self.source = source
        self.model_bytes = bytes(model_bytes)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        proto = model_pb2.ModelProto()
        try:
            proto.ParseFromString(self.model_bytes)
        except Exception as e:  # protobuf raises its own DecodeError
            raise TokenizerError(f"{source} is not a SentencePiece model file: {e}") from None
        if not proto.pieces:
            raise TokenizerError(f"{source} is not a SentencePiece model file (it has no pieces)")
        pieces = [p.piece for p in proto.pieces]
        self.num_sentinels = _check_reserved(proto, num_sentinels, source)
        self.vocab_size = len(pieces)
        self.special_ids = SpecialIds(self.vocab_size, self.num_sentinels)
        self.model_type = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        # Every special id but '<unk>' (which stands for text): decoded by us, never produced from text.
        self._special = frozenset(i for i in self.special_ids.special if i != UNK_ID)
        # Special pieces from a foreign model may be USER_DEFINED (matched inside text); make them CONTROL.
        for i in self._special:
            proto.pieces[i].type = _Piece.CONTROL
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            # Text that follows a special piece is encoded and decoded without the dummy leading space.
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_continue = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except RuntimeError as e:
            raise TokenizerError(f"SentencePiece cannot load {source}: {e}") from None
        self._pieces = pieces
        # What parse_special recognises: every special piece but '<pad>' (padding is never text).
        self._special_piece_ids = {pieces[i]: i for i in self._special if i != PAD_ID}
        self._special_re = re.compile("|".join(re.escape(p) for p in sorted(self._special_piece_ids, key=len)[::-1]))
        special = np.zeros(self.vocab_size, bool)
        special[list(self.special_ids.special)] = True
        #: [vocab] True where a piece begins a new word: it starts with '▁' or is a special piece.
        self.is_word_start = np.array([p.startswith(WORD_START) for p in pieces]) | special
        self.is_word_start.flags.writeable = False
        self._ends_space = np.array([_ends_with_space(p) for p in proto.pieces]) & ~special

    @classmethod
    def load(cls, path: str | os.PathLike, num_sentinels: int | None = None) -> Tokenizer:
        """From a local file or a gs:// object (read whole into memory; SentencePiece loads the bytes)."""
        path = storage.path(path) if storage.is_remote(path) else Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist (or is not a file)")
        return cls(path.read_bytes(), num_sentinels=num_sentinels, source=os.fspath(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model file atomically (a reader never sees half a file; one object write on a bucket)."""
        if storage.is_remote(path):
            path = storage.path(path)
            path.write_bytes(self.model_bytes)
            return path
        path = Path(path)
        _atomic_write(path, self.model_bytes)
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, {self.model_type}, vocab_size={self.vocab_size}, "
                f"num_sentinels={self.num_sentinels}, sha256={self.sha256[:12]})")

    # --- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = False) -> list[int]:
        """Token ids of `text`. With `parse_special`, literal special pieces ('[MASK]', '<extra_id_3>',
        '</s>', ...; not '<pad>' or '<unk>') in the text become their ids; otherwise they are ordinary text."""
        ids = self._encode_special(text) if parse_special else self._sp.encode(text)
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
                     parse_special: bool = False) -> list[list[int]]:
        if parse_special or add_bos or add_eos:
            return [self.encode(t, add_bos=add_bos, add_eos=add_eos, parse_special=parse_special) for t in texts]
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def _encode_special(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += (self._sp_continue if pos else self._sp).encode(text[pos : m.start()])
            ids.append(self._special_piece_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += (self._sp_continue if pos else self._sp).encode(text[pos:])
        return ids

    # --- decoding -------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. Padding is dropped; other reserved pieces and sentinels are written as their piece
        text ('[MASK]', '<extra_id_0>', '</s>') unless `skip_special`. '<unk>' is shown as ' ⁇ '."""
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                out.append((self._sp_continue if any(out) else self._sp).decode(run))
                run.clear()

        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside this vocabulary [0, {self.vocab_size})")
            if i in self._special:
                flush()
                if i != PAD_ID and not skip_special:
                    out.append(self._pieces[i])
            else:
                run.append(i)
        flush()
        return "".join(out)

    # --- vocabulary -----------------------------------------------------------------------------------
    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._pieces[i] == piece else None

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """[..., length] bool: the tokens that begin a word, for whole-word masking. Like `is_word_start`,
        plus the first token and every token after one that ends in whitespace: in code, the keyword after
        a newline or an indent piece ('▁▁▁▁', 'return') has no '▁' of its own."""
        ids = np.asarray(ids, dtype=np.intp)
        starts = self.is_word_start[ids].copy()
        if ids.shape[-1]:
            starts[..., 0] = True
            starts[..., 1:] |= self._ends_space[ids[..., :-1]]
        return starts



def _ends_with_space(piece: _Piece) -> bool:
    if piece.type == _Piece.BYTE:  # '<0x0A>'
        return chr(int(piece.piece[3:5], 16)).isspace()
    return piece.piece[-1:].replace(WORD_START, " ").isspace()


def _check_reserved(proto: model_pb2.ModelProto, num_sentinels: int | None, source: str) -> int:
    """Raises unless `proto` has llmjax's reserved pieces; returns its number of sentinels."""
    pieces = [p.piece for p in proto.pieces]
    fix = "train a new one (data.tokenizer_model='') or pick a model made by llmjax"
    if len(pieces) <= len(RESERVED_PIECES):
        raise TokenizerError(f"tokenizer model {source} has only {len(pieces)} pieces; {fix}")
    for i, expected in enumerate(RESERVED_PIECES):
        if pieces[i] != expected:
            raise TokenizerError(
                f"tokenizer model {source}: id {i} is {pieces[i]!r} but llmjax reserves it for {expected!r} "
                f"(ids 0-{len(RESERVED_PIECES) - 1} must be {', '.join(RESERVED_PIECES)}); {fix}")
    if proto.pieces[UNK_ID].type != _Piece.UNKNOWN:
        raise TokenizerError(
            f"tokenizer model {source}: id {UNK_ID} ({pieces[UNK_ID]!r}) is not the unknown piece; {fix}")
    found = 0
    while found < len(pieces) - len(RESERVED_PIECES) and pieces[len(pieces) - 1 - found] == sentinel_piece(found):
        found += 1
    if num_sentinels is None:
        return found
    if found != num_sentinels:
        top = len(pieces) - 1 - min(found, num_sentinels)
        raise TokenizerError(
            f"tokenizer model {source} has {found} sentinels at the top of its {len(pieces)} pieces but "
            f"{num_sentinels} were asked for (sentinel i must be {sentinel_piece('i')!r} at id vocab_size-1-i; "
            f"id {top} is {pieces[top]!r}); set data.num_sentinels={found} or {fix}")
    return found


def training_sentences(text: str, max_chars: int = _MAX_SENTENCE_CHARS) -> Iterable[str]:
    """Cuts a document into paragraphs (newlines kept) of at most `max_chars` for the trainer."""
    chunk: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
        if not line.strip():  # a blank line ends a paragraph
            if chunk and "".join(chunk).strip():
                yield "".join(chunk)
            chunk, size = [], 0
    if chunk and "".join(chunk).strip():
        yield "".join(chunk)


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """A uniform sample (reservoir, seeded) of at most `max_sentences` training sentences of `texts`."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for sentence in training_sentences(text):
            if not sentence.strip():
                continue
            if len(sample) < max_sentences:
                sample.append(sentence)
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    sample[j] = sentence
            seen += 1
    return sample


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, num_sentinels: int = 100,
                    model_type: str = "unigram", max_sentences: int = 100_000,
                    character_coverage: float = 0.9995, seed: int = 0) -> Tokenizer:
    """Trains a SentencePiece model of exactly `vocab_size` pieces (the reserved ids at the bottom, the
    sentinels at the top) on a seeded sample of at most `max_sentences` paragraphs of `texts`."""
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if num_sentinels < 0:
        raise TokenizerError(f"num_sentinels={num_sentinels} must be >= 0")
    if vocab_size < min_vocab_size(num_sentinels):
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: {len(RESERVED_PIECES)} reserved ids + {NUM_BYTE_PIECES} "
            f"byte pieces + {num_sentinels} sentinels + {MIN_LEARNED_PIECES} learned pieces need at least "
            f"{min_vocab_size(num_sentinels)}")
    if max_sentences < 1:
        raise TokenizerError(f"max_sentences={max_sentences} must be >= 1")
    sentences = sample_sentences(texts, max_sentences, seed)
    if not sentences:
        raise TokenizerError("cannot train a tokenizer on an empty corpus (no non-blank text)")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size - num_sentinels,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            pad_piece=RESERVED_PIECES[PAD_ID], eos_piece=RESERVED_PIECES[EOS_ID],
            unk_piece=RESERVED_PIECES[UNK_ID], bos_piece=RESERVED_PIECES[BOS_ID],
            control_symbols=list(RESERVED_PIECES[BOS_ID + 1 :]),
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=character_coverage,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # already sampled, deterministically
            num_sub_iterations=1,  # unigram EM: as good as the default 2 here (measured), twice as fast
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e)):
            raise TokenizerError(
                f"vocab_size={vocab_size} is too large for this corpus: {len(sentences)} paragraphs support at "
                f"most {int(m.group(2)) + num_sentinels} pieces ({num_sentinels} of them sentinels); lower "
                f"vocab_size or add text") from None
        raise TokenizerError(
            f"SentencePiece could not train a {model_type} vocabulary of {vocab_size} pieces "
            f"({num_sentinels} of them sentinels) on {len(sentences)} paragraphs: {e}".rstrip()) from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for i in reversed(range(num_sentinels)):  # sentinel i lands at id vocab_size - 1 - i
        proto.pieces.add(piece=sentinel_piece(i), score=0.0, type=_Piece.CONTROL)
    proto.trainer_spec.vocab_size = vocab_size
    tok = Tokenizer(proto.SerializeToString(), num_sentinels=num_sentinels, source="<trained>")
    assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
    return tok


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
