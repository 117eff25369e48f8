"""Tokenizer: reserved ids and sentinels where llmjax expects them, lossless round trips, clear load errors."""

import hashlib
import io

import numpy as np
import pytest
import sentencepiece as spm

from llmjax.data import corpus
from llmjax.data.tokenizer import Tokenizer, TokenizerError, min_vocab_size, train_tokenizer
from llmjax.data.vocab import RESERVED_PIECES, SpecialIds

VOCAB, SENTINELS = 1000, 100


@pytest.fixture(scope="module")
def texts():
    docs = [d.text for d in corpus.topic_documents()]
    path = corpus.stdlib_dir() / "json" / "decoder.py"
    docs += [d.text for d in corpus.module_documents(path, "json/decoder.py")]
    return docs


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=VOCAB, num_sentinels=SENTINELS, max_sentences=3000)


ROUND_TRIP = [
    "",
    " ",
    "Hello, world.",
    "  two leading spaces and two trailing  ",
    "double  spaces\tand a tab",
    "line one\nline two\n\n\nafter blank lines\n",
    "def f(x):\n    if x:\n        return [x, 12345]\n\treturn None  # tab-indented\n",
    "windows\r\nline endings\r\n",
    "café naïve ﬁ ① 日本語 🤖 \u00a0nbsp \u200bzero-width",
    "numbers 3.14159 and 2**63-1 and 0xFF",
    "literal specials stay text: [MASK] [CLS] <extra_id_0> </s> <pad> <unk>",
]


def pieces(tok, ids):
    return [tok.id_to_piece(i) for i in ids]


def test_reserved_ids_exactly_as_documented(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.id_to_piece(i) for i in range(10)] == list(RESERVED_PIECES)
    assert [tok.id_to_piece(i) for i in range(10)] == ["<pad>", "</s>", "<unk>", "<s>", "[CLS]", "[SEP]", "[MASK]",
                                                       "[NLU]", "[NLG]", "[S2S]"]
    assert [tok.special_ids.mode(p) for p in ("[NLU]", "[NLG]", "[S2S]")] == [7, 8, 9]
    # UL2's mode tokens are control pieces: text never becomes them, parse_special does
    assert tok.encode("[NLU] x")[0] != 7 and tok.encode("[S2S] x", parse_special=True)[0] == 9
    assert tok.special_ids == SpecialIds(VOCAB, SENTINELS)
    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)  # the raw model agrees
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == VOCAB


def test_sentinels_at_the_top(tok):
    for i in range(SENTINELS):
        assert tok.id_to_piece(VOCAB - 1 - i) == f"<extra_id_{i}>"
        assert tok.special_ids.sentinel(i) == VOCAB - 1 - i
    below = tok.id_to_piece(tok.special_ids.first_sentinel - 1)
    assert not below.startswith("<extra_id_")
    # Ordinary text never uses a sentinel or a reserved id other than by byte fallback.
    ids = np.concatenate([tok.encode(t) for t in ROUND_TRIP])
    assert not np.isin(ids, tok.special_ids.special).any()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, parse_special=True)) == text


def test_round_trip_whole_training_corpus(tok, texts):
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert [tok.decode(x) for x in ids] == texts
    # Indentation and newlines are learned as pieces, not spelled out as bytes.
    assert "▁▁▁▁" in tok._pieces and any("\n" in p for p in tok._pieces)
    assert tok.encode("\n") != [tok.piece_to_id("<0x0A>")]


def test_specials_come_only_from_parse_special(tok):
    text = "The [MASK] sat on <extra_id_0> mat.</s>"
    assert not set(tok.encode(text)) & set(tok.special_ids.special)
    ids = tok.encode(text, parse_special=True)
    assert 6 in ids and tok.special_ids.sentinel(0) in ids and ids[-1] == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "The  sat on  mat."


def test_decode_handles_specials(tok):
    hi = tok.encode("hi there")
    assert tok.decode([0, 0] + hi + [1, 0, 0]) == "hi there</s>"  # padding is never text
    assert tok.decode(tok.encode("hi there", add_bos=True, add_eos=True)) == "<s> hi there</s>"
    assert tok.decode([3] + hi + [1], skip_special=True) == "hi there"
    # A span-corruption target: sentinels shown, spaces kept where the tokens have them.
    target = [tok.special_ids.sentinel(0)] + tok.encode("cat") + [tok.special_ids.sentinel(1)]
    assert tok.decode(target) == "<extra_id_0> cat<extra_id_1>"
    assert tok.decode(np.array(hi, np.int32)) == "hi there"
    with pytest.raises(TokenizerError, match="outside this vocabulary"):
        tok.decode([VOCAB])


def test_encode_flags(tok):
    ids = tok.encode("hello")
    assert tok.encode("hello", add_bos=True, add_eos=True) == [3] + ids + [1]
    assert tok.encode_batch(["hello", "world"], add_eos=True) == [ids + [1], tok.encode("world") + [1]]


def test_word_starts(tok):
    assert tok.is_word_start.shape == (VOCAB,) and tok.is_word_start.dtype == bool
    for i in range(VOCAB):
        assert tok.is_word_start[i] == (tok.id_to_piece(i).startswith("▁") or i in tok.special_ids.special)
    ids = tok.encode("the quick brown fox")
    assert tok.is_word_start[ids].sum() == 4  # every word begins with '▁'
    code = tok.encode("x = 1\nreturn x\n")
    starts = tok.word_starts(code)
    after_newline = [i + 1 for i, t in enumerate(code[:-1]) if tok.id_to_piece(t).endswith("\n")]
    assert after_newline and starts[after_newline].all() and starts[0]
    assert tok.word_starts(np.array([code, code])).shape == (2, len(code))


def test_save_load_hash(tok, tmp_path):
    path = tok.save(tmp_path / "t.model")
    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = Tokenizer.load(path)  # number of sentinels inferred
    assert loaded.num_sentinels == SENTINELS and loaded.sha256 == tok.sha256
    assert loaded.encode(ROUND_TRIP[6]) == tok.encode(ROUND_TRIP[6])
    assert Tokenizer.load(path, num_sentinels=SENTINELS).special_ids == tok.special_ids


def test_training_is_deterministic_and_bpe_works(texts, tok):
    assert train_tokenizer(texts, vocab_size=VOCAB, num_sentinels=SENTINELS, max_sentences=3000).sha256 == tok.sha256
    small = texts[:20]
    a = train_tokenizer(small, vocab_size=600, num_sentinels=10, model_type="bpe", max_sentences=500)
    b = train_tokenizer(small, vocab_size=600, num_sentinels=10, model_type="bpe", max_sentences=500)
    assert a.sha256 == b.sha256 and a.model_type == "bpe"
    assert [a.id_to_piece(i) for i in range(len(RESERVED_PIECES))] == list(RESERVED_PIECES)
    assert a.id_to_piece(599) == "<extra_id_0>" and a.id_to_piece(590) == "<extra_id_9>"
    assert all(a.decode(a.encode(t)) == t for t in small + ROUND_TRIP)


def _plain_sentencepiece(texts, path, **options):
    """A model trained with SentencePiece's own defaults or the given options: not an llmjax tokenizer."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[:30]), model_writer=model, vocab_size=500,
                                   minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return path


def test_foreign_model_fails_clearly(texts, tmp_path):
    path = _plain_sentencepiece(texts, tmp_path / "foreign.model")  # unk=0, bos=1, eos=2, no pad
    with pytest.raises(TokenizerError) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value) and "id 0" in str(e.value) and "'<unk>'" in str(e.value)
    assert "'<pad>'" in str(e.value)


def test_model_without_mode_tokens_fails_clearly(texts, tmp_path):
    """A tokenizer made before UL2's mode tokens were reserved (ids 7-9 are learned pieces) is refused."""
    path = _plain_sentencepiece(texts, tmp_path / "old.model", pad_id=0, eos_id=1, unk_id=2, bos_id=3,
                                user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"])
    with pytest.raises(TokenizerError, match=r"id 7 is .* reserves it for '\[NLU\]' \(ids 0-9 must be"):
        Tokenizer.load(path, num_sentinels=0)


def test_model_without_sentinels_fails_clearly(texts, tmp_path):
    path = _plain_sentencepiece(
        texts, tmp_path / "nosentinels.model", pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        user_defined_symbols=list(RESERVED_PIECES[4:]))
    with pytest.raises(TokenizerError, match=r"has 0 sentinels .* 100 were asked for .*num_sentinels=0") as e:
        Tokenizer.load(path, num_sentinels=100)
    assert str(path) in str(e.value)
    tok = Tokenizer.load(path, num_sentinels=0)  # valid with no sentinels
    # Its USER_DEFINED specials are made CONTROL: literal "[MASK]" in text is not the mask id.
    assert 6 not in tok.encode("a [MASK] b") and 6 in tok.encode("a [MASK] b", parse_special=True)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="missing.model does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\xfe not a protobuf at all")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer.load(junk)


def test_training_errors(texts):
    with pytest.raises(TokenizerError, match=f"vocab_size=400 is too small.*at least {min_vocab_size(100)}"):
        train_tokenizer(texts, vocab_size=400, num_sentinels=100)
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer(["", "  \n\n "], vocab_size=1000)
    with pytest.raises(TokenizerError, match="too large for this corpus.*at most"):
        train_tokenizer(["hello world"] * 3, vocab_size=1000)
    with pytest.raises(TokenizerError, match="model_type 'wordpiece'"):
        train_tokenizer(texts, vocab_size=1000, model_type="wordpiece")
