"""SentencePiece tokenizer: trained on first use and cached, or loaded from a path.

Ids: pad=0, bos=1, eos=2, unk=3, then 256 byte pieces (`byte_fallback`, so any text encodes
without unk), then the learned pieces. `none_id == vocab_size` is one extra *model output* id
meaning "no insertion"; it is not a SentencePiece piece, and `decode` drops it.

Files, each written under a temporary name in the same folder and then renamed, so a reader
sees either no file or a whole one:

    <dir>/<name>.model        the SentencePiece model;
    <dir>/<name>.counts.npy   int64 [vocab_size], occurrences of each id in the encoded
                              training sample (specials 0), for the `unigram` scorer.

The counts are written before the model, so once the model exists its counts do too. Processes
other than the writer poll for the model file (the folder must be on a shared filesystem).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIALS = 4
MODEL_TYPES = ("bpe", "unigram")
# 4 specials + 256 byte pieces + "▁". SentencePiece also needs one piece per distinct character
# of the training text (character_coverage=1.0), so the real minimum depends on the text.
MIN_VOCAB_SIZE = NUM_SPECIALS + 256 + 1

_WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's escaped space.
# SentencePiece skips training lines longer than this (its default, 4192 bytes, is too short
# for paragraphs).
_MAX_SENTENCE_BYTES = 1 << 16
_COUNT_CHUNK = 4096  # texts per encode_batch call when counting.
_POLL_S = 0.2


def counts_path_for(model_path: str) -> str:
    """`<dir>/<name>.model` -> `<dir>/<name>.counts.npy`."""
    root, ext = os.path.splitext(model_path)
    return (root if ext == ".model" else model_path) + ".counts.npy"


class Tokenizer:
    """A SentencePiece model with semdiff's reserved ids, word starts and unigram counts.

    Attributes:
        model_path: the `.model` file it was loaded from.
        counts: int64 [vocab_size], occurrences of each id in the training sample, or None.
        word_start_table: bool [vocab_size], True where a piece begins a new word: pieces
            starting with "▁" or another whitespace character, whitespace byte pieces, and
            bos/eos/unk. False for pad and for pieces that continue a word.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, sp: spm.SentencePieceProcessor, model_path: str,
                 counts: np.ndarray | None = None):
        specials = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"the tokenizer {model_path} has pad/bos/eos/unk ids {specials}, semdiff needs "
                f"{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}: retrain it with train_tokenizer (or "
                "SentencePiece with pad_id=0 bos_id=1 eos_id=2 unk_id=3).")
        self._sp = sp
        self.model_path = model_path
        self.counts = None if counts is None else self._checked_counts(counts)
        self.word_start_table = _word_start_table(sp)

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces; ids are 0 .. vocab_size - 1."""
        return self._sp.get_piece_size()

    @property
    def none_id(self) -> int:
        """The extra model output id meaning "no insertion"; not a piece."""
        return self.vocab_size

    @classmethod
    def load(cls, model_path: str, counts_path: str | None = None) -> Tokenizer:
        """Loads a `.model` file, and the counts at `counts_path` (default: beside the model).

        An explicit `counts_path` must exist; without one, missing counts leave `counts` None.
        """
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"no SentencePiece model at {model_path}: give the path of an existing .model "
                "file, or none to train one in the workdir.")
        try:
            sp = spm.SentencePieceProcessor(model_file=model_path)
        except RuntimeError as e:
            reason = " ".join(str(e).split())
            raise ValueError(
                f"{model_path} is not a SentencePiece model ({reason}): give a .model file "
                "written by SentencePiece, or delete it to retrain.") from e
        if counts_path is None:
            counts_path = counts_path_for(model_path)
            if not os.path.isfile(counts_path):
                return cls(sp, model_path)
        elif not os.path.isfile(counts_path):
            raise FileNotFoundError(
                f"no unigram counts at {counts_path}: give the path of an existing .counts.npy "
                "file, or counts_path=None to load the model without them.")
        return cls(sp, model_path, np.load(counts_path, allow_pickle=False))

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, without bos/eos."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> piece ids of each, without bos/eos (encoded on several threads)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        """int [L] (list, numpy or jax) -> text; drops pad, bos, eos and ids outside the vocab."""
        return self._sp.decode(self._kept(ids))

    def pieces(self, ids) -> list[str]:
        """int [L] -> pieces for display, dropping the same ids as `decode`."""
        return [self._sp.id_to_piece(i) for i in self._kept(ids)]

    def word_ids(self, ids) -> np.ndarray:
        """int [..., L] -> int32 [..., L]: the index of the word each position belongs to.

        The index is the number of word starts up to and including the position, minus one,
        along the last axis. Positions before the first word start (text cut mid-word) get 0.
        Pad and ids outside the vocab (none_id) never start a word.
        """
        ids = np.asarray(ids)
        in_vocab = (ids >= 0) & (ids < self.vocab_size)
        starts = in_vocab & self.word_start_table[np.where(in_vocab, ids, PAD_ID)]
        return np.maximum(np.cumsum(starts, axis=-1, dtype=np.int32) - 1, 0)

    def unigram_logprob(self) -> np.ndarray:
        """float32 [vocab_size]: log p(id) from the counts, add-one smoothed over non-specials.

        The exp of the non-special entries sums to 1; the four specials get 0.0.
        """
        if self.counts is None:
            raise ValueError(
                f"the tokenizer at {self.model_path} has no unigram counts: call get_tokenizer "
                f"with texts_fn (it computes and saves {counts_path_for(self.model_path)}), or "
                "put an int64 [vocab_size] .npy file there.")
        smoothed = self.counts[NUM_SPECIALS:].astype(np.float64) + 1.0
        logp = np.zeros(self.vocab_size, np.float64)
        logp[NUM_SPECIALS:] = np.log(smoothed) - np.log(smoothed.sum())
        return logp.astype(np.float32)

    def _checked_counts(self, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.shape != (self.vocab_size,) or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"the unigram counts for {self.model_path} have shape {counts.shape} and dtype "
                f"{counts.dtype}, not int64 [{self.vocab_size}]: delete "
                f"{counts_path_for(self.model_path)} and call get_tokenizer with texts_fn to "
                "recompute them.")
        return counts.astype(np.int64)

    def _kept(self, ids) -> list[int]:
        """The ids that decode to text: not pad/bos/eos, not outside the vocab."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"expected one sequence of ids, got shape {ids.shape}: decode each "
                             "row separately.")
        if ids.size == 0:
            return []
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"expected integer ids, got dtype {ids.dtype}.")
        ids = ids.reshape(-1)
        keep = (ids >= 0) & (ids < self.vocab_size)
        keep &= (ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)
        return ids[keep].tolist()


def _word_start_table(sp: spm.SentencePieceProcessor) -> np.ndarray:
    table = np.zeros(sp.get_piece_size(), np.bool_)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0x0A>"; bytes from 0x80 are parts of multi-byte characters.
            byte = int(piece[3:5], 16)
            table[i] = byte < 0x80 and chr(byte).isspace()
        elif sp.is_control(i) or sp.is_unknown(i):
            table[i] = i != PAD_ID
        else:
            table[i] = piece.startswith(_WORD_BOUNDARY) or piece[:1].isspace()
    return table


def _bounded(texts: Iterable[str], max_sentences: int | None) -> Iterator[str]:
    """The first `max_sentences` texts (all if None) as str."""
    if max_sentences is not None and max_sentences <= 0:
        raise ValueError(f"max_sentences={max_sentences} must be positive, or None for all "
                         "texts.")
    return itertools.islice(map(_as_str, texts), max_sentences)


def _as_str(text) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):  # tfds Text features come back as bytes.
        return text.decode("utf-8")
    raise TypeError(f"tokenizer texts must be str (or UTF-8 bytes), got {type(text).__name__}.")


def count_tokens(tokenizer: Tokenizer, texts: Iterable[str],
                 max_sentences: int | None = None) -> np.ndarray:
    """int64 [vocab_size]: occurrences of each id in the encoded texts, specials set to 0.

    Streams the first `max_sentences` texts (all if None) in chunks, without holding them all.
    """
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    texts = _bounded(texts, max_sentences)
    while chunk := list(itertools.islice(texts, _COUNT_CHUNK)):
        flat = np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(chunk)),
                           np.int64)
        counts += np.bincount(flat, minlength=tokenizer.vocab_size)
    counts[:NUM_SPECIALS] = 0
    return counts


def train_tokenizer(texts: Iterable[str], model_path: str, *, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int | None = None) -> Tokenizer:
    """Trains SentencePiece on `texts`, writes model and counts atomically, and loads them.

    Args:
        texts: training texts (sentences, lines or paragraphs); may be a one-shot iterator.
            The first `max_sentences` are held in memory: shuffle upstream for a random
            sample, and bound it for a large corpus.
        model_path: the `.model` file to write; the counts go to `counts_path_for(model_path)`.
        vocab_size: requested number of pieces: at least 4 specials + 256 bytes + one per
            distinct character of the sample. A small sample may give fewer pieces
            (`Tokenizer.vocab_size` is the actual number).
        model_type: "bpe" (fast to train) or "unigram".
        max_sentences: bound on the training sample; the counts are over the same sample.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: use one of "
                         f"{MODEL_TYPES}.")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} (4 specials "
            "+ 256 byte pieces + one per distinct character of the text); raise vocab_size.")
    sample = list(_bounded(texts, max_sentences))
    if not any(text.strip() for text in sample):
        raise ValueError(f"no training text: the {len(sample)} texts given to train the "
                         f"tokenizer at {model_path} are all blank; check the training split.")
    too_long = sum(len(text.encode("utf-8")) > _MAX_SENTENCE_BYTES for text in sample)
    if too_long:
        logging.warning("%d of %d training texts exceed %d bytes: SentencePiece skips them "
                        "(they are still counted).", too_long, len(sample), _MAX_SENTENCE_BYTES)

    start = time.time()
    proto = _train_proto([text for text in sample if text], vocab_size, model_type)
    tokenizer = Tokenizer(spm.SentencePieceProcessor(model_proto=proto), model_path)
    tokenizer.counts = count_tokens(tokenizer, sample)
    # Counts first: a waiting process takes the model's appearance to mean both files are there.
    _save_counts(tokenizer.counts, model_path)
    _write_atomic(model_path, lambda f: f.write(proto))
    logging.info("trained a %s tokenizer on %d texts in %.1f s: %d pieces (%d asked) -> %s",
                 model_type, len(sample), time.time() - start, tokenizer.vocab_size,
                 vocab_size, model_path)
    return tokenizer


def _train_proto(sample: list[str], vocab_size: int, model_type: str) -> bytes:
    """The serialized SentencePiece model trained on `sample`, in memory."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            # With whitespace kept as is, decode(encode(x)) == x, double spaces included.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            hard_vocab_limit=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # SentencePiece's default, 16 threads, oversubscribes small machines.
            num_threads=min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if not too_small:
            raise
        raise ValueError(
            f"vocab_size={vocab_size} is too small for this text: it needs at least "
            f"{too_small.group(1)} (4 specials + 256 byte pieces + one per distinct character); "
            "raise vocab_size.") from None
    return model.getvalue()


def _write_atomic(path: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """Writes `path` through `write(file)` under a temporary name in its folder, then renames."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    # Not tempfile.mkstemp: its files are private (0600); these get the usual umask mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_counts(counts: np.ndarray, model_path: str) -> None:
    _write_atomic(counts_path_for(model_path), lambda f: np.save(f, counts, allow_pickle=False))


def _trained_with(tokenizer: Tokenizer) -> tuple[int, str]:
    """(vocab_size asked, model_type) recorded in the model's trainer spec."""
    # Needs protobuf; imported here so that encoding and decoding never do.
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto.FromString(tokenizer._sp.serialized_model_proto())
    spec = proto.trainer_spec
    return spec.vocab_size, model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower()


def get_tokenizer(model_path: str, texts_fn: Callable[[], Iterable[str]] | None, *,
                  vocab_size: int, model_type: str = "bpe", max_sentences: int | None = None,
                  is_writer: bool = True, wait_timeout_s: float = 600.0) -> Tokenizer:
    """Loads the tokenizer at `model_path`, training and saving it first where it is missing.

    Args:
        model_path: the `.model` file, e.g. `<workdir>/tokenizer/spm.model` or a user's model.
        texts_fn: returns the training texts; called only to train, or to compute counts
            missing beside an existing model (every process computes them; the writer saves).
        vocab_size, model_type, max_sentences: as in `train_tokenizer`. An existing model
            trained with another vocab_size or model_type is used as it is, with a warning.
        is_writer: True in exactly one process (jax.process_index() == 0): it trains and
            writes; the others wait for the model file to appear.
        wait_timeout_s: how long a non-writer waits before a TimeoutError.
    """
    if not os.path.exists(model_path):
        if not is_writer:
            _wait_for(model_path, wait_timeout_s)
        elif texts_fn is None:
            raise ValueError(f"no tokenizer at {model_path} and no texts to train one: pass "
                             "texts_fn, or the path of an existing .model file.")
        else:
            return train_tokenizer(texts_fn(), model_path, vocab_size=vocab_size,
                                   model_type=model_type, max_sentences=max_sentences)

    tokenizer = Tokenizer.load(model_path)
    trained_with = _trained_with(tokenizer)
    if trained_with != (vocab_size, model_type):
        logging.warning("the tokenizer at %s was trained with vocab_size=%d model_type=%s, "
                        "not the vocab_size=%d model_type=%s asked for; using it as it is "
                        "(delete it to retrain).", model_path, *trained_with, vocab_size,
                        model_type)
    if tokenizer.counts is None and texts_fn is not None:
        tokenizer.counts = count_tokens(tokenizer, texts_fn(), max_sentences)
        if is_writer:
            try:
                _save_counts(tokenizer.counts, model_path)
            except OSError as e:  # e.g. a read-only folder holding the user's model.
                logging.warning("could not save unigram counts beside %s (%s); they are kept "
                                "in memory only.", model_path, e)
    return tokenizer


def _wait_for(path: str, timeout_s: float) -> None:
    """Polls until `path` exists; TimeoutError after `timeout_s` seconds."""
    logging.info("waiting up to %.0f s for the writer process to create %s", timeout_s, path)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {timeout_s:g} s for {path}, which the writer process (is_writer=True, "
                "process 0) trains: look for its error, or raise wait_timeout_s.")
        time.sleep(_POLL_S)
