r"""Tests for semdiff.data.tokenizer.

The committed fixture `tests/testdata/tiny_spm.model` (+ `tiny_spm.counts.npy`, vocab 384,
about 6 KB) is for other tests that need a tokenizer quickly. It was made from the repository
root with:

    python -c "import sys; sys.path.insert(0, 'tests'); from test_tokenizer import english_like; \
from semdiff.data.tokenizer import train_tokenizer; \
train_tokenizer(english_like(2000, seed=0), 'tests/testdata/tiny_spm.model', vocab_size=384)"

`test_tiny_model_matches_its_recipe` fails when the training options change; rerun the command.
"""

import os
import pickle
import random
import threading
import time

import numpy as np
import pytest

from semdiff.data import tokenizer as tk

TINY_MODEL = os.path.join(os.path.dirname(__file__), "testdata", "tiny_spm.model")

_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
""".split()


def english_like(n: int, seed: int) -> list[str]:
    """`n` sentences of 3-14 words drawn from a fixed list of ~250 English words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))).capitalize()
            + rng.choice(".?!") for _ in range(n)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return english_like(3000, seed=1)


@pytest.fixture(scope="module")
def tok(texts, tmp_path_factory) -> tk.Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer" / "spm.model"
    return tk.train_tokenizer(iter(texts), str(path), vocab_size=600)


def test_reserved_ids(tok):
    assert (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID, tk.UNK_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.pieces([3]) == ["<unk>"]
    assert tok.vocab_size == 600
    assert tok.none_id == tok.vocab_size


@pytest.mark.parametrize("text", [
    "The sun and the sea.",
    "  two  spaces,\ta tab\nand a new line ",
    "Unseen: Zürich 中文 😀 1234567890 ~`@#",
    "",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok, texts):
    assert tok.encode_batch(texts[:50]) == [tok.encode(t) for t in texts[:50]]


def test_decode_drops_pad_bos_eos_none_and_out_of_range(tok):
    import jax.numpy as jnp

    ids = tok.encode("the old man")
    noisy = [tok.bos_id, *ids[:2], tok.pad_id, tok.none_id, -1, 10**6, *ids[2:], tok.eos_id,
             tok.pad_id]
    for form in (noisy, np.array(noisy, np.int32), jnp.array(noisy)):
        assert tok.decode(form) == "the old man"
        assert tok.pieces(form) == tok.pieces(ids)
    assert tok.decode([]) == "" and tok.decode(np.zeros((0,), np.int32)) == ""
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_counts_cover_every_encoded_token(tok, texts):
    encoded = tok.encode_batch(texts)
    assert tok.counts.dtype == np.int64 and tok.counts.shape == (tok.vocab_size,)
    assert tok.counts.sum() == sum(map(len, encoded))
    assert (tok.counts[:4] == 0).all()
    the = tok.encode("the")
    assert len(the) == 1 and tok.counts[the[0]] == sum(seq.count(the[0]) for seq in encoded)
    saved = np.load(tk.counts_path_for(tok.model_path))
    np.testing.assert_array_equal(saved, tok.counts)


def test_unigram_logprob_is_a_distribution_over_non_specials(tok):
    logp = tok.unigram_logprob()
    assert logp.dtype == np.float32 and logp.shape == (tok.vocab_size,)
    assert (logp[:4] == 0.0).all()
    assert np.isfinite(logp).all() and (logp[4:] < 0).all()
    np.testing.assert_allclose(np.logaddexp.reduce(logp[4:].astype(np.float64)), 0.0,
                               atol=1e-5)
    # Add-one smoothing: an id never seen still has probability, below any seen id.
    unseen, seen = tok.counts[4:] == 0, tok.counts[4:] > 0
    assert unseen.any() and logp[4:][unseen].max() < logp[4:][seen].min()


def test_word_ids_group_the_pieces_of_each_word(tok):
    text = "the earthfatherchildren of  mother\nworld"
    ids = tok.encode(text)
    words = tok.word_ids(ids)
    assert words.dtype == np.int32 and words.shape == (len(ids),)
    assert words[0] == 0 and (np.diff(words) >= 0).all()
    pieces = tok.pieces(ids)
    grouped = ["".join(p for p, w in zip(pieces, words) if w == k)
               for k in range(words[-1] + 1)]
    # The double space leaves a piece "▁" as a word of its own; "\n" (a byte piece here, as
    # the corpus has none) starts a word.
    assert grouped == ["▁the", "▁earthfatherchildren", "▁of", "▁", "▁mother", "<0x0A>world"]
    assert len(tok.encode(" earthfatherchildren")) > 1  # a word of several pieces
    # Pad and none_id never start a word; a batch is grouped row by row.
    padded = np.array([ids + [tok.pad_id, tok.none_id], [tok.bos_id] + ids + [tok.eos_id]])
    batch = tok.word_ids(padded)
    np.testing.assert_array_equal(batch[0], np.r_[words, words[-1], words[-1]])
    np.testing.assert_array_equal(batch[1], np.r_[0, words + 1, words[-1] + 2])


def test_word_start_table(tok):
    table = tok.word_start_table
    assert table.dtype == np.bool_ and table.shape == (tok.vocab_size,)
    assert list(table[:4]) == [False, True, True, True]
    for i in range(4, tok.vocab_size):
        piece = tok.pieces([i])[0]
        assert table[i] == (piece.startswith("▁") or piece[0].isspace()
                            or piece in ("<0x09>", "<0x0A>", "<0x0B>", "<0x0C>", "<0x0D>",
                                         "<0x1C>", "<0x1D>", "<0x1E>", "<0x1F>", "<0x20>")), piece


def test_training_writes_atomically_and_leaves_no_temp_files(tok):
    assert sorted(os.listdir(os.path.dirname(tok.model_path))) == ["spm.counts.npy", "spm.model"]


def test_failed_write_leaves_nothing(tmp_path):
    def fail(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tk._write_atomic(str(tmp_path / "spm.model"), fail)
    assert os.listdir(tmp_path) == []


def test_get_tokenizer_trains_once_then_loads(texts, tmp_path):
    path = str(tmp_path / "spm.model")
    first = tk.get_tokenizer(path, lambda: texts, vocab_size=500)
    mtimes = [os.stat(p).st_mtime_ns for p in (path, tk.counts_path_for(path))]

    def must_not_train():
        raise AssertionError("get_tokenizer retrained an existing tokenizer")

    second = tk.get_tokenizer(path, must_not_train, vocab_size=500)
    assert [os.stat(p).st_mtime_ns for p in (path, tk.counts_path_for(path))] == mtimes
    assert second.encode(texts[0]) == first.encode(texts[0])
    np.testing.assert_array_equal(second.counts, first.counts)


def test_non_writer_waits_for_the_writer(texts, tmp_path):
    path = str(tmp_path / "tokenizer" / "spm.model")
    errors = []

    def writer():
        try:
            time.sleep(0.5)
            tk.get_tokenizer(path, lambda: texts, vocab_size=500, is_writer=True)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    start = time.monotonic()
    reader = tk.get_tokenizer(path, None, vocab_size=500, is_writer=False, wait_timeout_s=30)
    waited = time.monotonic() - start
    thread.join()
    assert not errors
    assert waited >= 0.4
    assert reader.counts is not None
    assert reader.decode(reader.encode(texts[0])) == texts[0]


def test_non_writer_times_out_clearly(tmp_path):
    path = str(tmp_path / "spm.model")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waited 0\.3 s for .*spm\.model.*is_writer=True"):
        tk.get_tokenizer(path, None, vocab_size=500, is_writer=False, wait_timeout_s=0.3)
    assert time.monotonic() - start < 5


def test_max_sentences_bounds_the_sample(texts, tmp_path):
    one_shot = (t.encode("utf-8") for t in texts)  # tfds gives bytes; a generator runs once.
    tok = tk.train_tokenizer(one_shot, str(tmp_path / "spm.model"), vocab_size=500,
                             max_sentences=200)
    assert tok.counts.sum() == sum(map(len, tok.encode_batch(texts[:200])))


def test_unigram_model_type(texts, tmp_path):
    tok = tk.train_tokenizer(texts[:1000], str(tmp_path / "spm.model"), vocab_size=800,
                             model_type="unigram")
    assert 300 < tok.vocab_size <= 800  # hard_vocab_limit=False: fewer on a small corpus
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_user_model_without_counts(tok, texts, tmp_path):
    path = str(tmp_path / "user.model")
    with open(tok.model_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    bare = tk.Tokenizer.load(path)
    assert bare.counts is None
    with pytest.raises(ValueError, match=r"no unigram counts.*texts_fn.*user\.counts\.npy"):
        bare.unigram_logprob()
    with pytest.raises(FileNotFoundError, match="no unigram counts at"):
        tk.Tokenizer.load(path, str(tmp_path / "missing.npy"))

    reader = tk.get_tokenizer(path, lambda: texts, vocab_size=600, is_writer=False)
    assert not os.path.exists(tk.counts_path_for(path))  # only the writer saves
    writer = tk.get_tokenizer(path, lambda: texts, vocab_size=600)
    for counted in (reader.counts, writer.counts, tk.Tokenizer.load(path).counts):
        np.testing.assert_array_equal(counted, tok.counts)


def test_pickles(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("the sun") == tok.encode("the sun")
    np.testing.assert_array_equal(clone.counts, tok.counts)


def test_committed_tiny_model():
    tiny = tk.Tokenizer.load(TINY_MODEL)
    assert os.path.getsize(TINY_MODEL) <= 50_000
    assert tiny.vocab_size == 384 and tiny.none_id == 384
    assert tiny.counts is not None and tiny.counts.shape == (384,)
    text = "The old man and the sea, 1952."
    assert tiny.decode(tiny.encode(text)) == text
    np.testing.assert_allclose(np.exp(tiny.unigram_logprob()[4:].astype(np.float64)).sum(), 1.0,
                               rtol=1e-5)


def test_tiny_model_matches_its_recipe(tmp_path):
    remade = tk.train_tokenizer(english_like(2000, seed=0), str(tmp_path / "tiny_spm.model"),
                                vocab_size=384)
    tiny = tk.Tokenizer.load(TINY_MODEL)
    assert tiny.pieces(range(tiny.vocab_size)) == remade.pieces(range(remade.vocab_size)), (
        "tests/testdata/tiny_spm.model no longer matches train_tokenizer: regenerate it with "
        "the command in this file's docstring.")
    np.testing.assert_array_equal(tiny.counts, remade.counts)


# Errors


@pytest.mark.parametrize("texts", [[], ["", "  ", "\n"]])
def test_no_training_text(texts, tmp_path):
    with pytest.raises(ValueError, match="no training text"):
        tk.train_tokenizer(iter(texts), str(tmp_path / "spm.model"), vocab_size=500)
    assert os.listdir(tmp_path) == []


def test_missing_model_path(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=f"no SentencePiece model at {path}"):
        tk.Tokenizer.load(path)
    with pytest.raises(ValueError, match="no tokenizer at .* pass texts_fn"):
        tk.get_tokenizer(path, None, vocab_size=500)


@pytest.mark.parametrize("content", [b"not a model", b""])
def test_garbage_model_file(tmp_path, content):
    path = tmp_path / "garbage.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"garbage\.model is not a SentencePiece model") as e:
        tk.Tokenizer.load(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tk.get_tokenizer(str(path), lambda: ["some text"], vocab_size=500)


def test_vocab_size_that_does_not_fit(texts, tmp_path):
    path = str(tmp_path / "spm.model")
    with pytest.raises(ValueError, match="vocab_size=100 is too small: the minimum is 261"):
        tk.train_tokenizer(texts, path, vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size=270 is too small for this text: it needs "
                                         r"at least \d+"):
        tk.train_tokenizer(texts, path, vocab_size=270)
    with pytest.raises(ValueError, match="model_type='word' is not supported"):
        tk.train_tokenizer(texts, path, vocab_size=500, model_type="word")
    with pytest.raises(ValueError, match="max_sentences=0 must be positive"):
        tk.train_tokenizer(texts, path, vocab_size=500, max_sentences=0)
    assert os.listdir(tmp_path) == []


def test_model_with_other_special_ids(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()  # SentencePiece's defaults: unk=0, bos=1, eos=2, no pad.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(english_like(300, seed=2)),
                                   model_writer=model, vocab_size=100, minloglevel=2)
    path = tmp_path / "default_ids.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"pad/bos/eos/unk ids \(-1, 1, 2, 0\)"):
        tk.Tokenizer.load(str(path))


def test_existing_model_trained_differently_is_used_with_a_warning(tok, caplog):
    with caplog.at_level("WARNING"):
        loaded = tk.get_tokenizer(tok.model_path, None, vocab_size=999, model_type="unigram")
    assert loaded.vocab_size == tok.vocab_size
    assert "trained with vocab_size=600 model_type=bpe" in caplog.text
