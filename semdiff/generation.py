"""Generation from a trained model: conditioning texts in, samples with drafts and diagnostics out.

`generate` is the notebook entry point (``semdiff.generate``)::

  exp, params = semdiff.train.load_trained("workdirs/default")   # restore once
  out = semdiff.generate(exp, params, keywords="dog park", num=8, delta=0.3)
  out.texts, out.records[0]["drafts"], out.records[0]["steps"]

or in one call from a workdir: ``semdiff.generate("workdirs/default", num=4, tau=0.2)``.
Keyword arguments beyond the named ones override ``config.sampler`` fields. The
``python -m semdiff.sample`` command is a thin wrapper of the same function.
"""

import dataclasses
import os
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from semdiff import sampling


class Generation(NamedTuple):
  """What `generate` returns.

  Attributes:
    texts: the final texts, one per sample.
    records: one JSON-ready dict per sample (see `records`).
    samples: the sampler's arrays (NumPy `sampling.Samples`).
    sampler_cfg: the settings used.
  """

  texts: list
  records: list
  samples: sampling.Samples
  sampler_cfg: sampling.SamplerConfig


def example_keys(seed: int, num: int) -> jax.Array:
  """[num] keys, example i's = fold_in(key(seed), i): sample i is the same for any num."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(np.arange(num))


def draw(exp, params, cfg: sampling.SamplerConfig, num: int, rng, *,
         embedding: Optional[np.ndarray] = None, idf: Optional[np.ndarray] = None):
  """(NumPy `Samples`, texts) of ``num`` samples under ``cfg`` (conditioning included).

  Args:
    exp: a `train.Experiment`; params: its parameters.
    rng: one key, or [num] keys (see `sampling.sample`).
    embedding, idf: the fixed table and the IDF weights of the sentence embedding.
  """
  tok = exp.tokenizer
  if exp.config.model_kind != "insertion":
    if cfg.keywords or cfg.prompt or cfg.infill or cfg.uses_embedding:
      raise ValueError(f"The {exp.config.model_kind} model has no conditioning: drop the "
                       "keywords, prompt, infill, epsilon and delta settings.")
    make = {"causal": sampling.make_causal_cached_sampler, "tree": sampling.make_tree_sampler,
            "slot": sampling.make_slot_sampler,
            "masked": sampling.make_masked_sampler}[exp.config.model_kind]
    samples = jax.device_get(make(exp.graphdef, cfg, num)(params,
                                                          rng if rng.shape == () else rng[0]))
  else:
    cond = sampling.conditioning(tok.encode, cfg.max_len, num, keywords=cfg.keywords,
                                 prompt=cfg.prompt, infill=cfg.infill)
    run = sampling.make_sampler(exp.graphdef, cfg, num)
    samples = jax.device_get(run(
        params, rng, *cond, embedding=embedding if cfg.embedding_source == "fixed" else None,
        idf=idf))
  texts = [tok.decode(samples.tokens[i, :samples.length[i]].tolist()) for i in range(num)]
  return samples, texts


def records(samples: sampling.Samples, texts: list, tokenizer) -> list[dict]:
  """One dict per sample: ``text``, ``length``, ``calls``, ``drafts`` (distinct draft
  texts) and, for the insertion sampler, ``steps``: per model call, the pieces inserted
  (in canvas order), their probabilities and the embedding distance ``moved``."""
  out = []
  for i, text in enumerate(texts):
    rec = {"text": text, "length": int(samples.length[i]), "calls": int(samples.calls[i]),
           "drafts": sampling.draft_texts(samples, i, tokenizer.decode)}
    if samples.inserted is not None:
      steps = []
      # (correction rounds past max_steps share the last row: calls may exceed the rows)
      for k in range(1, min(int(samples.calls[i]), samples.inserted.shape[0] - 1) + 1):
        ins = samples.inserted[k, i]
        where = np.flatnonzero(ins >= 0)
        steps.append({"inserted": tokenizer.pieces(ins[where].tolist()),
                      "probs": [round(float(p), 4) for p in samples.inserted_prob[k, i, where]],
                      "moved": round(float(samples.moved[k, i]), 5)})
      rec["steps"] = steps
    out.append(rec)
  return out


def sampler_config(exp, **overrides) -> sampling.SamplerConfig:
  """``exp``'s sampler settings with ``overrides`` (None values are left out)."""
  overrides = {k: v for k, v in overrides.items() if v is not None}
  known = {f.name for f in dataclasses.fields(sampling.SamplerConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"Unknown sampler setting(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(sorted(known))}.")
  return sampling.SamplerConfig.from_config(exp.config.sampler, **overrides)


def generate(source: Any, params=None, *, keywords: Optional[str] = None,
             prompt: Optional[str] = None, infill: Optional[str] = None, num: int = 8,
             seed: int = 0, step: Optional[int] = None, **sampler_overrides) -> Generation:
  """Samples from a trained model, with any of the sampler's controls.

  Args:
    source: a workdir written by the training job (restored with
      `train.load_trained`), or an `Experiment` (then pass ``params``).
    params: the parameters, when ``source`` is an `Experiment`.
    keywords: words that start the canvas and stay, in order ("dog park").
    prompt: a fixed prefix that is never changed.
    infill: a partial text whose ``___`` marks are the only gaps that grow.
    num: samples drawn (in one batch).
    seed: sample i uses fold_in(key(seed), i), so it does not depend on ``num``.
    step: which checkpoint of a workdir (default: the newest).
    **sampler_overrides: any `sampling.SamplerConfig` field: temperature, top_k,
      top_p, tau, epsilon, delta, embedding_source, max_steps, confidence, ...

  Returns:
    `Generation`.
  """
  from semdiff import train  # pylint: disable=g-import-not-at-top  (train imports this module)

  if isinstance(source, (str, os.PathLike)):
    exp, params = train.load_trained(os.fspath(source), step=step)
  elif params is None:
    raise ValueError("generate(experiment, params, ...): pass the parameters with the "
                     "experiment, or a workdir to restore both from.")
  else:
    exp = source
  if num < 1:
    raise ValueError(f"num={num} must be at least 1.")
  cfg = sampler_config(exp, keywords=keywords, prompt=prompt, infill=infill,
                       **sampler_overrides)
  table = idf = None
  if exp.config.model_kind != "causal":
    # IDF weights always, so that the "moved" diagnostics mean the same in every run.
    table, idf = train.fixed_embedding(exp.config, exp.workdir, exp.tokenizer, exp.scorer_cfg)
  samples, texts = draw(exp, params, cfg, num, example_keys(seed, num), embedding=table,
                        idf=idf)
  return Generation(texts=texts, records=records(samples, texts, exp.tokenizer),
                    samples=samples, sampler_cfg=cfg)
