"""Baichuan2Tokenizer: exact round trips, role ids, batching, streaming decode.

Every model used here is either the bundled asset or trained by the test in a temp dir.
"""
import io
import os
import pickle
import random

import pytest
import sentencepiece as spm

from baichuan2_tokenizer import Baichuan2Tokenizer, StreamDecoder
from train_tiny_tokenizer import iter_belle_texts, train_tokenizer

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "research", "baichuan2", "assets")
BUNDLED_MODEL = os.path.join(ASSETS, "tokenizer.model")
SAMPLE = os.path.join(ASSETS, "belle_sample.json")

ROUND_TRIP_TEXTS = [
    "今天天气怎么样？我想去公园散步。",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    " one leading space",
    "double  spaces   and three, trailing ",
    "digits 0123456789 and 3.14159",
    "emoji 😀🎉 and rare chars 龘𠀋",
    "line one\nline two\n\n\ttabbed",
    "<reserved_106>你好<reserved_107>你好！有什么可以帮你？",
    "mixed 中文 English 123 😀 ",
    "x</s> y<s>z",
]


@pytest.fixture(scope="module")
def sample_texts():
    return list(iter_belle_texts([SAMPLE]))


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, sample_texts):
    """A Baichuan2-layout model trained here (not the bundled file)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer(sample_texts, vocab_size=3000))
    return str(path)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory, sample_texts):
    """A lossless model without any <reserved_*> piece."""
    path = tmp_path_factory.mktemp("plain") / "tokenizer.model"
    path.write_bytes(train_tokenizer(sample_texts, vocab_size=3000, with_role_pieces=False))
    return str(path)


@pytest.fixture(scope="module")
def dummy_prefix_model(tmp_path_factory, sample_texts):
    """SentencePiece defaults (dummy prefix, whitespace folding), as many Llama-style models."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts), model_writer=buf, model_type="bpe",
                                   vocab_size=2000, character_coverage=0.98, byte_fallback=True,
                                   num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("dummy") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def tok(trained_model):
    return Baichuan2Tokenizer(vocab_file=trained_model)


def test_bundled_model_layout():
    tokenizer = Baichuan2Tokenizer(BUNDLED_MODEL)
    pieces = {i: tokenizer.convert_ids_to_tokens(i) for i in (0, 1, 2, 195, 196)}
    assert pieces == {0: "<unk>", 1: "<s>", 2: "</s>", 195: "<reserved_106>", 196: "<reserved_107>"}
    assert tokenizer.vocab_size == len(tokenizer) == 4000
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.user_token_id, tokenizer.assistant_token_id) == (195, 196)


def test_training_is_deterministic(sample_texts):
    assert train_tokenizer(sample_texts[:300], vocab_size=2500) == train_tokenizer(sample_texts[:300],
                                                                                    vocab_size=2500)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_emoji_goes_through_byte_fallback(tok):
    tokens = tok.tokenize("😀")
    assert tokens == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(tok.convert_tokens_to_ids(tokens)) == "😀"


def test_no_bos_or_eos_by_default(tok, trained_model):
    ids = tok.encode("你好")
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    wrapped = Baichuan2Tokenizer(trained_model, add_bos_token=True, add_eos_token=True).encode("你好")
    assert wrapped == [1] + ids + [2]


def test_role_piece_text_is_one_id(tok):
    assert tok.encode("<reserved_106>") == [195]
    assert tok.encode("<reserved_107>") == [196]
    assert tok.encode("<reserved_106>问<reserved_107>")[::2] == [195, 196]


def test_batch_padding_to_max_length(tok):
    texts = ["你好", "hello world 😀", "写一篇关于气候变化的文章。"]
    batch = tok(texts, max_length=64, padding="max_length")
    for text, ids, mask in zip(texts, batch["input_ids"], batch["attention_mask"]):
        n = len(tok.encode(text))
        assert len(ids) == 64
        assert ids[:n] == tok.encode(text) and ids[n:] == [0] * (64 - n)
        assert mask == [1] * n + [0] * (64 - n)


def test_decode_special_tokens(tok):
    ids = [1] + tok.encode("你好 world") + [2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "你好 world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>你好 world</s><unk>"
    # Role tokens are ordinary pieces, as in the released tokenizer: never skipped.
    assert tok.decode([195, 2], skip_special_tokens=True) == "<reserved_106>"


def test_role_ids_from_pieces_and_overrides(trained_model):
    assert (Baichuan2Tokenizer(trained_model).user_token_id,
            Baichuan2Tokenizer(trained_model).assistant_token_id) == (195, 196)
    tokenizer = Baichuan2Tokenizer(trained_model, user_token_id=7, assistant_token_id=8)
    assert (tokenizer.user_token_id, tokenizer.assistant_token_id) == (7, 8)


def test_missing_role_piece_raises_clear_error(plain_model):
    tokenizer = Baichuan2Tokenizer(plain_model)
    assert tokenizer.decode(tokenizer.encode("a  b")) == "a  b"  # otherwise usable
    with pytest.raises(ValueError) as err:
        _ = tokenizer.user_token_id
    message = str(err.value)
    assert plain_model in message and "<reserved_106>" in message and "user_token_id" in message
    assert "YAML" in message
    with pytest.raises(ValueError, match="<reserved_107>.*assistant_token_id"):
        _ = tokenizer.assistant_token_id
    fixed = Baichuan2Tokenizer(plain_model, user_token_id=5, assistant_token_id=6)
    assert (fixed.user_token_id, fixed.assistant_token_id) == (5, 6)


def test_bad_role_override_is_rejected(trained_model):
    with pytest.raises(ValueError, match="user_token_id"):
        Baichuan2Tokenizer(trained_model, user_token_id="195")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _ = Baichuan2Tokenizer(trained_model, assistant_token_id=10 ** 6).assistant_token_id


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        Baichuan2Tokenizer(str(tmp_path / "nope.model"))


def test_built_from_yaml_style_config(trained_model):
    from mindformers.models.build_tokenizer import build_tokenizer
    tokenizer = build_tokenizer({"type": "Baichuan2Tokenizer", "vocab_file": trained_model,
                                 "user_token_id": 195, "assistant_token_id": 196})
    assert isinstance(tokenizer, Baichuan2Tokenizer)
    assert tokenizer.user_token_id == 195


def test_save_vocabulary_and_pickle(tok, trained_model, tmp_path):
    (saved,) = tok.save_vocabulary(str(tmp_path))
    with open(saved, "rb") as f, open(trained_model, "rb") as g:
        assert f.read() == g.read()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("你好 world") == tok.encode("你好 world")


# ----- streaming -------------------------------------------------------------------------------
def stream(tokenizer, ids, skip_special_tokens=False):
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    chunks = [decoder.put(i) for i in ids]
    return chunks, decoder.end()


@pytest.mark.parametrize("skip", [False, True])
def test_stream_equals_full_decode_on_belle_text(tok, sample_texts, skip):
    for text in sample_texts[:40]:
        ids = [195] + tok.encode(text[:200]) + [196, 1] + tok.encode(" 😀 end") + [2]
        chunks, tail = stream(tok, ids, skip)
        assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert tail == ""


def test_stream_never_emits_partial_characters(tok):
    text = "中😀文 🎉龘𠀋 ok"
    ids = tok.encode(text)
    assert sum(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids)) >= 8
    chunks, tail = stream(tok, ids)
    assert "".join(chunks) == text and tail == ""
    assert all("\ufffd" not in chunk for chunk in chunks)
    emoji = tok.encode("😀")
    assert [StreamDecoder(tok).put(i) for i in emoji[:1]] == [""]
    assert stream(tok, emoji)[0] == ["", "", "", "😀"]


def test_stream_end_flushes_incomplete_character(tok):
    ids = tok.encode("a😀")[:-2]
    chunks, tail = stream(tok, ids)
    assert chunks == ["a", "", ""]
    assert "".join(chunks) + tail == tok.decode(ids)


def test_stream_keeps_spaces_with_dummy_prefix_model(dummy_prefix_model):
    tokenizer = Baichuan2Tokenizer(dummy_prefix_model)
    ids = tokenizer.encode("hello world, 你好 世界 😀 x")
    chunks, tail = stream(tokenizer, ids)
    assert "".join(chunks) + tail == tokenizer.decode(ids)
    assert "hello world, 你好 世界 😀 x" in "".join(chunks)


@pytest.mark.parametrize("which", ["trained", "dummy_prefix"])
def test_stream_matches_decode_on_random_ids(which, trained_model, dummy_prefix_model):
    """Random ids rich in byte pieces, lone spaces and specials, including invalid UTF-8."""
    tokenizer = Baichuan2Tokenizer(trained_model if which == "trained" else dummy_prefix_model)
    sp = tokenizer.sp_model
    byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    space = sp.piece_to_id("\u2581")
    rng = random.Random(1234)
    for _ in range(600):
        ids = [rng.choice([rng.randrange(3, sp.get_piece_size()), rng.choice(byte_ids),
                           rng.choice(byte_ids), space, 0, 1, 2]) for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            chunks, tail = stream(tokenizer, ids, skip)
            assert "".join(chunks) + tail == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_stream_decoder_reset(tok):
    decoder = tok.stream_decoder()
    decoder.put(tok.encode("😀")[0])
    decoder.reset()
    assert "".join(decoder.put(i) for i in tok.encode("你好")) == "你好"
