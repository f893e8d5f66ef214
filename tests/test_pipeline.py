r"""The input pipeline: every source, bad data, exact resumption, and the training step.

Offline by design: the TFDS datasets are `tfds.testing.mock_data` over the metadata committed
in `tests/testdata/tfds/` (remake it with `python tests/testdata/tfds/make_metadata.py`), plus
a tiny builder (`tests/testdata/toy_corpus`) that TFDS really prepares as ArrayRecord in a
temporary folder. The real-English test reads `<repo>/../shared/data/tinyshakespeare.txt` and
skips when it is absent.

The training step of the `tiny` config compiles once for the module (`stepper`); every source
feeds it batches through `sharding.global_batch`, as `train.train_and_evaluate` does. Its
tokenizer is trained from the real corpus through `pipeline.tokenizer_texts` when that is
there, else it is the committed `tests/testdata/tiny_spm.model`.
"""

import json
import os
import socket
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.experimental.compilation_cache import compilation_cache

from semdiff import config_files
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline
from semdiff.data import text_files
from semdiff.data import tfds_sources
from semdiff.data import tokenizer as tokenizer_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TESTDATA = os.path.join(ROOT, "tests", "testdata")
TFDS_METADATA = os.path.join(TESTDATA, "tfds")
TINY_SPM = os.path.join(TESTDATA, "tiny_spm.model")
SHAKESPEARE = os.path.join(ROOT, os.pardir, "shared", "data", "tinyshakespeare.txt")
needs_shakespeare = pytest.mark.skipif(
    not os.path.isfile(SHAKESPEARE), reason=f"no real corpus at {SHAKESPEARE}")


def tiny_config(**overrides):
  """The tiny variant of configs/default.py with ``{"data.name": ..., ...}`` applied."""
  return config_files.load(variant="tiny", overrides=overrides)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Programs compiled by several tests (and test files) of this session compile once."""
  compilation_cache.set_cache_dir(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  compilation_cache.reset_cache()


@pytest.fixture
def mock_tfds():
  """lm1b and tiny_shakespeare as TFDS mock data (200 random texts per split), offline."""
  with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=TFDS_METADATA):
    yield


# --- a directory of messy files ---------------------------------------------------------------

LONG_LINE = " ".join(f"Sentence number {k} is here." for k in range(60))
RECORDS = [  # the lines of a_records.jsonl, and what each one is
    (b'{"text": "A record."}', "ok"),
    (b'{"body": "no text field"}', "missing_field"),
    (b'{not json', "bad_json"),
    (b'{"text": 7}', "missing_field"),
    (b'{"text": "   "}', "empty"),
    (b"", "empty"),
    (b'{"text": "caf\xe9"}', "undecodable"),
    (b'{"text": "Another record. With two sentences."}', "ok"),
    (b"[1, 2]", "missing_field"),
]


def make_messy_dir(folder):
  """Writes a folder of messy files; returns it. 12 texts, the last 3 (zz_tail) held out."""
  files = {
      "a_records.jsonl": b"\n".join(line for line, _ in RECORDS) + b"\n",
      "blank.txt": b"\n\n  \n",                                    # 3 empty lines: no text
      "crlf.txt": b"A windows line.\r\nAnother one.\r\n",
      "empty.txt": b"",
      "latin1.txt": b"good line one.\ncaf\xe9 au lait\ngood line two.\n",
      "long.txt": (LONG_LINE + "\n" + "x" * 600 + "\nshort\n").encode(),
      "zz_tail.txt": b"held out one.\nheld out two.\nheld out three.\n",
      "notes.md": b"# not read: a folder stands for its .txt and .jsonl files\n",
  }
  os.makedirs(folder, exist_ok=True)
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return str(folder)


@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory):
  return make_messy_dir(tmp_path_factory.mktemp("messy"))


def messy_config(messy_dir, **overrides):
  return tiny_config(**{"data.name": "text_files", "data.files": messy_dir,
                        "data.eval_fraction": 0.25, **overrides})


# --- the training step ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stepper(tmp_path_factory):
  """(tokenizer, run): ``run(batches, n) -> losses`` trains n tiny steps from a fresh state."""
  workdir = str(tmp_path_factory.mktemp("stepper"))
  if os.path.isfile(SHAKESPEARE):
    config = tiny_config(**{"data.name": "text_files", "data.files": SHAKESPEARE,
                            "data.unit": "paragraph"})
    tok = train.load_tokenizer(config, workdir)  # trained through pipeline.tokenizer_texts
  else:
    config, tok = tiny_config(), tokenizer_lib.Tokenizer.load(TINY_SPM)
  exp = train.build_experiment(config, workdir, tokenizer=tok)
  step = train.make_train_step(exp)

  def run(batches, n):
    state, losses = train.init_state(exp), []
    for _ in range(n):
      state, metrics = step(state, sharding.global_batch(next(batches), exp.mesh))
      losses.append(float(metrics["loss"]))
    return losses

  return tok, run


# --- the one interface --------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("nope", "Unknown dataset 'nope'; choose one of c4, grammar, lm1b, text_files, "
             "tiny_shakespeare, wikitext103, tfds:<catalog name>"),
    ("tfds:", "names no dataset: use tfds:<name>"),
    ("tfds:no_such_dataset", "'no_such_dataset' is not a dataset of the TFDS catalog"),
], ids=["unknown", "tfds_without_name", "tfds_unknown"])
def test_an_unknown_dataset_is_one_clear_error(name, message):
  with pytest.raises(ValueError) as error:
    pipeline.text_source(tiny_config(**{"data.name": name}), "train")
  assert message in str(error.value)


def test_every_catalog_entry_is_a_dataset_name():
  for name in ("lm1b", "tiny_shakespeare", "wikitext103", "c4"):
    assert name in pipeline.DATASETS and tfds_sources.entry_for(name).text_key == "text"
  assert tfds_sources.entry_for("tfds:ag_news_subset", "description") == \
      tfds_sources.CatalogEntry("ag_news_subset", text_key="description")
  assert tfds_sources.entry_for("grammar") is None


# --- text files -------------------------------------------------------------------------------


def test_messy_files_are_indexed_and_every_skip_is_counted(messy_dir, stepper):
  tok, _ = stepper
  files = text_files.load(messy_dir)
  want = {"empty": 5, "undecodable": 2, "bad_json": 1, "missing_field": 3}
  assert files.stats.skipped == want
  assert files.stats.first == {
      "empty": f"{messy_dir}/a_records.jsonl:5", "undecodable": f"{messy_dir}/a_records.jsonl:7",
      "bad_json": f"{messy_dir}/a_records.jsonl:3",
      "missing_field": f"{messy_dir}/a_records.jsonl:2"}
  assert (files.stats.files, files.stats.empty_files, len(files)) == (7, 2, 12)
  assert [files[i] for i in range(len(files))] == [
      "A record.", "Another record. With two sentences.", "A windows line.", "Another one.",
      "good line one.", "good line two.", LONG_LINE, "x" * 600, "short",
      "held out one.", "held out two.", "held out three."]

  report = pipeline.describe(messy_config(messy_dir), tok)
  assert report.sizes == {"train": 9, "validation": 3}
  assert report.sample.texts == 9 and report.sample.cut == 2 and not report.sample.skipped
  line = report.line()
  for part in ("7 file(s) (2 empty)", "5 empty (first: ", "2 undecodable", "1 bad_json",
               "3 missing_field", "2 are longer than 32 tokens (cut at sentence boundaries)"):
    assert part in line, line
  dropped = pipeline.describe(messy_config(messy_dir, **{"data.split_long": False}), tok)
  assert dropped.sample.skipped == {"too_long": 2} and "dropped as too_long" in dropped.line()


def test_messy_files_train_and_report_what_they_skipped(messy_dir, stepper):
  tok, run = stepper
  config = messy_config(messy_dir)
  losses = run(pipeline.train_iterator(config, tok), 2)
  assert np.isfinite(losses).all(), losses

  batches = pipeline.train_iterator(config, tok)
  rows = []
  while batches.stats.texts < 9:
    batch = next(batches)
    assert batch["tokens"].shape == (16, 32) and batch["mask"].any(axis=1).all()
    rows += [tok.decode(r[m]) for r, m in zip(batch["tokens"], batch["mask"])]
  assert batches.stats.cut >= 2 and batches.stats.examples > batches.stats.texts
  assert "held out one." not in rows and "short" in rows
  pieces = [r for r in rows if r.startswith("Sentence number")]
  assert pieces and all(r.endswith("is here.") for r in pieces), pieces  # whole sentences
  assert batches.stats.line().startswith(f"{batches.stats.texts:,} texts -> ")

  held_out = pipeline.eval_batches(config, tok)
  assert [tok.decode(r[m]) for b in held_out for r, m in zip(b["tokens"], b["mask"])
          if m.any()] == ["held out one.", "held out two.", "held out three."]


@pytest.mark.parametrize("files, field, message", [
    ("{d}/nothing/*.txt", "text", "pattern '{d}/nothing/*.txt' matches no file"),
    ("", "text", "data.name=text_files needs data.files"),
    ("{d}/empty.txt,{d}/blank.txt", "text",
     "hold no text (skipped: 3 empty (first at {d}/blank.txt:1)): check the files."),
    ("{d}/a_records.jsonl", "title", "that their records have a string field 'title' "
                                     "(data.jsonl_field)"),
], ids=["no_match", "no_files", "empty_files", "missing_field"])
def test_text_files_without_text_are_one_clear_error(messy_dir, files, field, message):
  config = messy_config(messy_dir, **{"data.files": files.format(d=messy_dir),
                                      "data.jsonl_field": field})
  with pytest.raises(ValueError) as error:
    pipeline.text_source(config, "train")
  assert message.format(d=messy_dir) in str(error.value)


def test_paragraphs_and_jsonl_field(tmp_path):
  path = tmp_path / "play.txt"
  path.write_bytes(b"ALICE:\nHello there.\nHow are you?\n\n\nBOB:\nFine.\n\xff\nCAROL:\nHi.\n")
  files = text_files.TextFiles([str(path)], unit="paragraph")
  assert list(files) == ["ALICE:\nHello there.\nHow are you?", "BOB:\nFine.", "CAROL:\nHi."]
  assert files.stats.skipped == {"undecodable": 1}  # and it ends its paragraph
  records = tmp_path / "r.jsonl"
  records.write_text('{"body": "one"}\n{"text": "two"}\n')
  files = text_files.TextFiles([str(records)], field="body")
  assert list(files) == ["one"] and files.stats.skipped == {"missing_field": 1}


def test_cutting_keeps_whole_sentences(stepper):
  tok, _ = stepper
  tables = pipeline.piece_tables(tok)
  text = ("The cat sat. It was warm! Was it? " * 8 + "A line without end\nand another "
          "line\n" * 6).strip()
  ids = np.asarray(tok.encode(text), np.int32)
  for max_len in (8, 12, 32):
    pieces = pipeline.cut_at_sentences(ids, max_len, tables)
    assert all(0 < len(p) <= max_len for p in pieces)
    solid = ids[~tables.space[ids]]
    assert np.array_equal(np.concatenate(pieces)[~tables.space[np.concatenate(pieces)]], solid)
    texts = [tok.decode(p) for p in pieces]
    # Every piece of the first part starts a sentence when sentences fit.
    if max_len == 32:
      sentences = [t for t in texts if "line" not in t]
      assert all(t[0].isupper() and t[-1] in ".!?" for t in sentences), texts
      lines = [t for t in texts if "line" in t and "." not in t]
      assert all(t.startswith(("A line", "and another")) for t in lines), texts


# --- TFDS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_tfds_mock_data_goes_through_the_pipeline_and_training_step(name, mock_tfds, stepper):
  del mock_tfds
  tok, run = stepper
  config = tiny_config(**{"data.name": name, "data.tfds_data_dir": "/nonexistent"})
  report = pipeline.describe(config, tok)
  assert report.sizes == {"train": 200, "validation": 64} and report.sample.examples == 200
  texts = list(pipeline.tokenizer_texts(config)())
  assert len(texts) == 200 and all(isinstance(t, str) and t for t in texts)
  losses = run(pipeline.train_iterator(config, tok), 2)
  assert np.isfinite(losses).all(), losses
  held_out = pipeline.eval_batches(config, tok, batch_size=16)
  assert sum(int(b["mask"].any(axis=1).sum()) for b in held_out) == 64


def test_tfds_builder_prepared_as_array_record_offline(tmp_path, monkeypatch, stepper):
  """A real TFDS builder, prepared in a temporary data_dir and read by random access."""
  tok, _ = stepper
  monkeypatch.syspath_prepend(TESTDATA)
  import toy_corpus  # pylint: disable=g-import-not-at-top  registers the builder
  config = tiny_config(**{"data.name": "tfds:toy_corpus", "data.tfds_data_dir": str(tmp_path)})
  report = pipeline.describe(config, tok)
  assert report.sizes == {"train": 297, "validation": 3}  # no held-out split: the last 1%
  assert os.path.isdir(tmp_path / "toy_corpus" / "1.0.0")
  assert any(".array_record" in n for n in os.listdir(tmp_path / "toy_corpus" / "1.0.0"))
  texts = list(pipeline.tokenizer_texts(config)())
  assert all(isinstance(t, str) for t in texts)
  assert set(texts) <= {toy_corpus.text(i) for i in range(toy_corpus.NUM_RECORDS)}
  batches = pipeline.train_iterator(config, tok)
  while batches.stats.texts < 297:
    next(batches)
  skipped = batches.stats.skipped
  assert skipped.get("empty", 0) >= 1 and skipped.get("undecodable", 0) >= 1, skipped
  assert "toy_corpus train[:-1%] record" in batches.stats.first["undecodable"]
  assert batches.stats.cut >= 1

  # The same dataset as tfds.load prepares it (TFRecord) cannot be read by random access.
  folder = tmp_path / "toy_corpus" / "1.0.0"
  info = json.loads((folder / "dataset_info.json").read_text())
  (folder / "dataset_info.json").write_text(json.dumps(dict(info, fileFormat="tfrecord")))
  for name in os.listdir(folder):
    os.rename(folder / name, folder / name.replace("array_record", "tfrecord"))
  with pytest.raises(ValueError, match="prepared in another file format .* prepare it again "
                                       "with file_format='array_record'"):
    pipeline.text_source(config, "train")


def test_a_dataset_that_is_not_prepared_fails_fast_offline(tmp_path, monkeypatch):
  config = tiny_config(**{"data.name": "lm1b", "data.tfds_data_dir": str(tmp_path),
                          "data.tfds_download": False})
  with pytest.raises(FileNotFoundError, match="lm1b is not prepared in .* and "
                                              "data.tfds_download is False"):
    pipeline.text_source(config, "train")

  def offline(address, *args, **kwargs):
    raise OSError(f"no route to {address[0]}")

  def no_download(*args, **kwargs):
    raise AssertionError("download_and_prepare must not be called offline")

  for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
              "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(socket, "create_connection", offline)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  config.data.tfds_download = True
  start = time.time()
  with pytest.raises(ConnectionError) as error:
    pipeline.text_source(config, "train")
  assert time.time() - start < 10
  assert "www.statmt.org:80 is unreachable" in str(error.value)
  assert "prepare it on a machine with network" in str(error.value)


# --- resumption -------------------------------------------------------------------------------


def resume_configs(messy_dir):
  return {"grammar": tiny_config(), "text_files": messy_config(messy_dir),
          "lm1b": tiny_config(**{"data.name": "lm1b"})}


def _run(config, tok, total, restart_at=None, **process):
  """``total`` batches; with ``restart_at``, through a new iterator restored from a JSON
  round trip of the state saved after that many batches. Returns (batches, final stats)."""
  batches = pipeline.train_iterator(config, tok, **process)
  out = [next(batches) for _ in range(restart_at or 0)]
  if restart_at is not None:
    state = json.loads(json.dumps(batches.get_state()))
    batches = pipeline.train_iterator(config, tok, **process)
    batches.set_state(state)
  out += [next(batches) for _ in range(total - len(out))]
  return out, batches.stats


@pytest.mark.parametrize("name", ["grammar", "text_files", "lm1b"])
@pytest.mark.parametrize("devices", [1, 8])
def test_resumed_batches_equal_the_uninterrupted_ones(name, devices, messy_dir, mock_tfds,
                                                      stepper):
  del mock_tfds
  tok, _ = stepper
  config = resume_configs(messy_dir)[name]
  mesh = sharding.make_mesh(tiny_config(**{"mesh.data": devices}),
                            devices=jax.devices()[:devices])
  want, want_stats = _run(config, tok, 6)
  for restart_at in (1, 4):
    got, got_stats = _run(config, tok, 6, restart_at)
    assert got_stats == want_stats
    for a, b in zip(got, want):
      for key in ("tokens", "mask"):
        placed = sharding.global_batch({key: a[key]}, mesh)[key]
        assert len(placed.sharding.device_set) == devices
        np.testing.assert_array_equal(np.asarray(placed), b[key])


def test_two_processes_read_disjoint_halves_and_resume(messy_dir, stepper):
  tok, _ = stepper
  config = tiny_config(**{"data.name": "text_files", "data.unit": "paragraph", "data.files":
                          SHAKESPEARE if os.path.isfile(SHAKESPEARE) else messy_dir})
  whole, _ = _run(config, tok, 3)
  halves = []
  for index in (0, 1):
    want, _ = _run(config, tok, 3, process_index=index, process_count=2)
    got, _ = _run(config, tok, 3, 2, process_index=index, process_count=2)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert want[0]["tokens"].shape == (8, 32)
    halves.append(want)
  if os.path.isfile(SHAKESPEARE):  # distinct paragraphs: each process reads every other one
    zero, one = ({tuple(r) for r in h[0]["tokens"]} for h in halves)
    assert zero | one <= {tuple(r) for b in whole for r in b["tokens"]}
    assert not zero & one
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.train_iterator(config, tok, process_index=0, process_count=3)


def test_states_saved_by_earlier_pipelines_still_resume(stepper):
  """Checkpoints written before the iterator counted its texts hold grain's state alone;
  those written before it read TEXTS_PER_READ texts per grain element count texts."""
  tok, _ = stepper
  batches = pipeline.train_iterator(tiny_config(), tok)
  for _ in range(3):  # 48 examples: past the first chunk
    next(batches)
  state = batches.get_state()
  assert state["next_example"] == 1  # the grammar stream has one example per text
  text = state["reader"]["next_index"] * pipeline.TEXTS_PER_READ + state["text"]
  assert text >= pipeline.TEXTS_PER_READ
  want = next(batches)
  for old in ({"next_index": text + 1},
              {"reader": {"next_index": text}, "next_example": 1, "stats": state["stats"]}):
    resumed = pipeline.train_iterator(tiny_config(), tok)
    resumed.set_state(old)
    np.testing.assert_array_equal(next(resumed)["tokens"], want["tokens"])
  with pytest.raises(ValueError, match="texts per grain element"):
    pipeline.train_iterator(tiny_config(), tok).set_state({**state, "texts_per_read": 1})


# --- the tokenizer sample ---------------------------------------------------------------------


def test_tokenizer_texts_are_a_bounded_random_sample(messy_dir):
  config = messy_config(messy_dir, **{"data.tokenizer_sentences": 5})
  texts = list(pipeline.tokenizer_texts(config)())
  assert len(texts) == 5 and texts == list(pipeline.tokenizer_texts(config)())
  train_texts = pipeline.texts(messy_config(messy_dir), "train", 100)
  assert set(texts) <= set(train_texts) and texts != train_texts[:5]


@needs_shakespeare
def test_real_english_trains_through_text_files(stepper, tmp_path):
  tok, run = stepper
  # The stepper's tokenizer was trained on a bounded sample of this corpus, counts beside it.
  assert tok.counts is not None and tok.counts.sum() > 0
  assert os.path.isfile(tokenizer_lib.counts_path_for(tok.model_path))
  config = tiny_config(**{"data.name": "text_files", "data.files": SHAKESPEARE,
                          "data.unit": "paragraph"})
  report = pipeline.describe(config, tok)
  assert report.sizes["train"] > 5000 and report.scan.skipped == {}
  losses = run(pipeline.train_iterator(config, tok), 4)
  assert np.isfinite(losses).all(), losses
  sample = pipeline.texts(config, "validation", 3)
  assert all(tok.decode(tok.encode(t)) == t for t in sample)
