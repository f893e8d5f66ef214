r"""The default semdiff config: an insertion model on the embedded grammar corpus.

Variants (``--config=configs/default.py:VARIANT``):
  tiny   a few-minute smoke run (tests, Colab);
  small  the default: trains on 2 CPU cores in about 10 minutes;
  base   a real accelerator run.

Run:
  python -m semdiff.main --config=configs/default.py --workdir=/tmp/semdiff
  python -m semdiff.main --config=configs/default.py:tiny --workdir=/tmp/tiny \
      --config.scorer.name=balanced --config.train.num_steps=200

Any field can be overridden as ``--config.<group>.<field>=value``.
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = ("tiny", "small", "base")
# The scorer x frontier-share grid of `sweep()` (launch/sweep.py runs one job per point).
SWEEP_SCORERS = ("unigram", "balanced", "mix")
SWEEP_FRONTIER_PROBS = (0.0, 0.5)


def get_config(variant: str = "small") -> ml_collections.ConfigDict:
  """Returns the config of ``variant`` (one of VARIANTS)."""
  variant = variant or "small"
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown config variant {variant!r}; choose one of {', '.join(VARIANTS)} "
        "(e.g. --config=configs/default.py:tiny).")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  # "insertion" (semdiff: bidirectional over each level's canvas), "tree" (semdiff with
  # tree-causal attention: all levels in one pass; needs sampler.confidence=0), "slot" (tree
  # plus a query slot per gap: one pass teaches any insertion order; noise.frontier_prob is
  # its share of random orders), "causal" (the autoregressive baseline, KV-cache decoding) or
  # "masked" (masked diffusion: fixed canvas, absorbing mask, sampler.max_steps steps).
  c.model_kind = "insertion"

  c.data = ml_collections.ConfigDict()
  # "grammar" (embedded corpus), "text_files" (data.files), a TFDS dataset ("lm1b",
  # "tiny_shakespeare", "wikitext103", "c4") or "tfds:<catalog name>"; see docs/data.md.
  c.data.name = "grammar"
  c.data.seed = 0                   # which sentences the grammar corpus holds
  c.data.max_len = 48               # tokens per example; see split_long for longer texts
  # Cut texts longer than max_len at sentence boundaries into examples of <= max_len tokens;
  # False drops them. The grammar corpus always drops (its sentences keep exact log-probs).
  c.data.split_long = True
  # SentencePiece vocabulary (pad/bos/eos/unk and 256 byte pieces included). 1536: every
  # word of the grammar corpus is one piece (at 1024, 213 of its 585 words were split, 6% of
  # tokens, and a word's pieces take insertion steps of their own; 3000 steps: 73.8% vs 67.1%
  # grammatical over seeds 0-2, bound 44.05 vs 44.62; benchmarks/README.md).
  c.data.vocab_size = 1536
  c.data.tokenizer_type = "bpe"     # "bpe" (fast to train) or "unigram"
  c.data.tokenizer_path = ""        # a trained .model to load; "" trains one in the workdir
  c.data.tokenizer_sentences = 20000  # training texts sampled (shuffled) to train the tokenizer
  c.data.files = ""                 # text_files: glob(s), comma-separated, of .txt/.jsonl files
  c.data.unit = "line"              # text_files .txt and tiny_shakespeare: "line" or "paragraph"
  c.data.jsonl_field = "text"       # text_files .jsonl: the string field holding the text
  c.data.eval_files = ""            # text_files: held-out files ("" = hold out eval_fraction)
  c.data.eval_fraction = 0.1        # text_files: share of the texts (the last ones) held out
  c.data.text_key = ""              # TFDS: the feature holding the text ("" = "text")
  c.data.tfds_data_dir = ""         # TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.tfds_download = True       # TFDS: prepare a missing dataset (network); False: fail
  c.data.eval_examples = 512        # held-out texts for the NLL bound (at most)
  c.data.read_threads = 1           # grain reader threads (per process)
  c.data.prefetch = 256             # texts read (and tokenized) ahead

  c.scorer = ml_collections.ConfigDict()
  c.scorer.name = "unigram"         # see semdiff.scorers.names()
  c.scorer.word_level = True        # pieces of a word share its score
  c.scorer.mix_base = "unigram"     # for name="mix": blended with "balanced"
  c.scorer.mix_weight = 0.5
  c.scorer.tiebreak_seed = 0
  # Table of embedding_loo / embedding_greedy: "fixed" (PPMI + SVD of the corpus's token
  # co-occurrences, cached beside the tokenizer) or "model" (the model's input embedding).
  c.scorer.embedding_source = "fixed"
  c.scorer.refresh_every = 100      # model table (model_embedding): steps between snapshots
  c.scorer.embedding_dim = 64       # fixed table: width
  c.scorer.embedding_window = 4     # fixed table: co-occurrence window, tokens each side

  c.noise = ml_collections.ConfigDict()
  c.noise.frontier_prob = 0.5       # share of partial-level (frontier) training states
  c.noise.frontier_kind = "both"    # "level" (level + some of the next), "tree" (any), "both"
  c.noise.embed_loss_weight = 0.0   # lambda of the embedding-distance loss
  # Weight of the span loss: each gap also predicts every token it still lacks (needs
  # model.span_head; 0 = off).
  c.noise.span_loss_weight = 0.0
  # Levels drawn per example per step. 1 with twice the examples beat 2 at the same compute
  # (3000 steps: bound 44.19 vs 44.36, 61.3% vs 57.4% grammatical; benchmarks/README.md).
  c.noise.states_per_example = 1
  # Rows a batch's canvases (causal: sentences) are packed into (0 = no packing); each of the
  # train.grad_accum_steps micro-batches packs into 1/grad_accum_steps of them.
  # First-fit packing drops 0.02 of a batch's 128 canvases at 24 rows, none of the
  # causal baseline's sentences at 39 (200 batches; benchmarks/README.md).
  c.noise.pack_rows = 24
  c.noise.causal_pack_rows = 39     # model_kind=causal: rows its sentences are packed into
  # model_kind=slot: the order of its non-random training paths and of its bound: "level"
  # (a level's gaps decide together) or "sequential" (one at a time, left to right).
  c.noise.slot_order = "level"
  # Loss weight of each training state: "uniform", "height" (x (H + 1): the NLL bound's own
  # gradient) or "importance" (also undoes the level-frontier draw's bias; capped).
  c.noise.state_weight = "uniform"
  c.noise.frontier_weight_cap = 100.0
  # How a state's level h is drawn: "uniform" over 0..H, or "tokens" (in proportion to
  # its depth-h token count + 1: wide levels, more token targets per step; 4000 steps:
  # bound 43.37 vs 43.60, 82.8% vs 80.9% grammatical over sampling seeds 0-3;
  # benchmarks/README.md).
  c.noise.level_draw = "tokens"
  c.noise.level_draw_power = 1.0     # "tokens": in proportion to (m_h + 1) ** this (2: no gain)
  # Share of states that also keep 1..keyword_max random tokens of any depth: teaches the
  # keyword-conditioned sampler "x contains these words" (not "these are x's top level").
  c.noise.keyword_prob = 0.0
  c.noise.keyword_max = 3
  # Share of states that also show which empty gaps are closed (model.gap_state models):
  # what a sampler whose none closes its gap (sampler.select="certainty") feeds back, and
  # what the closed-gap NLL bound reads (each gap decides once).
  c.noise.closed_prob = 0.5
  # Share of states that are the whole sentence with random non-adjacent holes (every other
  # gap closed): teaches p(token | the rest), what sampler.refine_steps asks. hole_rate: the
  # most of a hole state's tokens that may be left out. hole_open: the most of a hole
  # state's empty gaps left open (target none; then a state may have no hole), so the model
  # also learns whether anything is missing (sampler.refine_edits="all").
  c.noise.hole_prob = 0.2
  c.noise.hole_rate = 0.5
  c.noise.hole_open = 1.0
  c.noise.hole_runs = False          # holes may be runs of adjacent tokens (no gain, measured)

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = config_dict.placeholder(int)  # set from the tokenizer at run time
  c.model.d_model = 128
  # 2 layers: at equal training time on 2 CPU cores, fewer layers and more steps win (one
  # run each, the job's sampler, then at top-p 0.9, over sampling seeds 0-3): 4 layers x
  # 4000 steps 82.3% and 84.4% grammatical (two training seeds), bound 43.36; 3 x 5000
  # 83.9%, 43.27; 2 x 6400 86.9%, 42.90; 1 x 9000 86.5%, 42.83 (benchmarks/README.md).
  # 0.75M parameters.
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.tie_embeddings = True
  c.model.dtype = "float32"         # compute dtype: "float32" or "bfloat16"
  c.model.remat = False             # rematerialise blocks in the backward pass
  c.model.gap_state = True          # insertion model: also reads the gaps known to be empty
  c.model.gap_slots = False         # insertion model: a position per gap (sequence 2T-1)
  c.model.span_head = False         # insertion model: a head for noise.span_loss_weight

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1        # cosine decay to this fraction of the peak
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.grad_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128          # global batch (examples)
  # Split each batch into this many micro-batches (one forward/backward each, one update):
  # activation memory of batch_size / grad_accum_steps, the same loss (see train.make_train_step).
  c.train.grad_accum_steps = 1
  # 9000 (2 layers): the README job takes about 10 minutes on 2 CPU cores. With the sampler
  # then at top-p 0.9, over sampling seeds 0-3: 8000 steps 89.9% grammatical, 9000 91.3%
  # (training seed 1), 10000 90.4%; at top-p 0.85, 9000 steps 92.5% (training seed 0; 90.3% at
  # top-p 0.9) (benchmarks/README.md).
  c.train.num_steps = 9000
  c.train.log_every = 50
  c.train.eval_every = 1500
  # Final eval: also the level-sweep bound (n + H + 1 calls per sentence; about a minute of
  # the default job, and within 0.1 nats of the parallel bound there: off).
  c.train.eval_sweep = False
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.num_samples = 256         # samples drawn (and checked) at the end
  c.train.samples_to_print = 5
  c.train.sample_every = 3000

  c.sampler = ml_collections.ConfigDict()
  c.sampler.temperature = 1.0       # 0 = greedy
  c.sampler.top_k = 0
  # 0.85: the README job's model (9000 steps) over sampling seeds 0-3, 256 samples each:
  # 92.5% grammatical at 5.66 tokens against 90.3% at 5.97 for 0.9 (0.8: 94.1% at 5.47);
  # the job's own 256: 92.2% against 87.9%, distinct-2 0.72 both (benchmarks/README.md).
  c.sampler.top_p = 0.85
  c.sampler.tau = 0.0               # probability threshold (0 = off)
  c.sampler.gaps = "all"            # "all" or "last" (left-to-right decoding)
  c.sampler.insert_per_step = 0     # confident-first: max insertions per step (0 = all)
  c.sampler.insert_fraction = 1.0   # confident-first: share of wanting gaps that insert
  c.sampler.confidence = 0.5        # confident-first: gaps with p >= this insert (>= 1 a step)
  c.sampler.select = "sample"       # confident-first: "sample", "certainty", "reserve", "level"
  c.sampler.stop_filter = "joint"   # "joint": none is a choice under top-k/p; "separate"
  c.sampler.none_bias = 0.0         # added to none's logit (< 0: longer texts)
  # select="sample": an all-none step stops only if every open gap has p(none) >= this;
  # else the gap least sure of none inserts its likeliest token (0 = off).
  c.sampler.stop_confidence = 0.95
  c.sampler.stop_rescues = 4         # at most this many such insertions per sample (0 = any)
  # The rescued gap's token: "likeliest" or "sample" (drawn, none left out). The likeliest
  # is mostly the commonest adjective ("big": 7.7% of sample tokens, 1.3% of the data's);
  # "sample": 6.8 tokens against 6.2, 77.7% grammatical against 82.6% (benchmarks/README.md).
  c.sampler.stop_rescue_token = "likeliest"
  # Correction rounds after a sample is finished (needs noise.hole_prob > 0 in training),
  # one model call each: a token less than refine_threshold times as likely (given the rest
  # of the sample) as the likeliest token for its place becomes that token; the most
  # doubtful one per sample, or with refine_parallel every one more doubtful than both
  # neighbours. Off: +2-3 points grammatical at equal diversity (benchmarks/README.md).
  c.sampler.refine_steps = 0
  c.sampler.refine_threshold = 0.03
  c.sampler.refine_parallel = True
  # "all": a round may also delete a token (its place likelier empty) and insert one into a
  # gap where a token is much likelier than nothing (needs noise.hole_open > 0).
  c.sampler.refine_edits = "replace"
  # Semantic controls on the sentence embedding E (IDF-weighted mean of a token table),
  # measured as 1 - cos between consecutive drafts:
  c.sampler.epsilon = 0.0           # stop when a step moves E by less than this (0 = off)
  c.sampler.delta = -1.0            # creativity: a step moves E by at most this (< 0 = off)
  c.sampler.embedding_source = "model"  # E's table: "model" (input embedding) or "fixed"
  # Conditioning (also flags of semdiff.sample): keywords kept in order, a fixed prompt
  # prefix, or a partial text whose "___" marks the only gaps that may grow.
  c.sampler.keywords = ""
  c.sampler.prompt = ""
  c.sampler.infill = ""
  c.sampler.max_steps = 48
  c.sampler.max_len = 48            # canvas capacity in tokens
  # Run each step on the smallest of the canvas sizes 8, 16, 32, ... (up to max_len) that
  # holds the drafts: the same samples for less compute; one compile per size.
  c.sampler.grow_canvas = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # data-parallel axis (-1 = all remaining devices)
  c.mesh.fsdp = 1                   # fully-sharded-parameter axis

  if variant == "tiny":
    c.data.vocab_size = 512
    c.data.tokenizer_sentences = 5000
    c.data.max_len = 32
    c.data.eval_examples = 64
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.mlp_dim = 128
    c.train.batch_size = 16
    c.noise.pack_rows = 8
    c.noise.causal_pack_rows = 8
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.train.sample_every = 10
    c.train.num_samples = 8
    c.train.samples_to_print = 2
    c.optim.warmup_steps = 5
    c.sampler.max_steps = 32
    c.sampler.max_len = 32
  elif variant == "base":
    c.data.max_len = 128
    c.data.vocab_size = 8192
    c.model.d_model = 512
    c.model.num_layers = 8
    c.model.num_heads = 8
    c.model.mlp_dim = 2048
    c.model.dtype = "bfloat16"
    c.train.batch_size = 512
    c.noise.pack_rows = 200
    c.noise.causal_pack_rows = 320
    c.train.num_steps = 100_000
    c.train.eval_every = 5000
    c.train.checkpoint_every = 2000
    c.train.sample_every = 5000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2000
    c.sampler.max_steps = 128
    c.sampler.max_len = 128
  return c


def sweep() -> list[dict]:
  """The default sweep: scorer x frontier_prob, as ``--config.<key>=value`` overrides.

  ``python launch/sweep.py --config=configs/default.py:small --dry_run`` prints one training
  command per dict, each with its own workdir.
  """
  return [{"scorer.name": scorer, "noise.frontier_prob": frontier}
          for scorer in SWEEP_SCORERS for frontier in SWEEP_FRONTIER_PROBS]
