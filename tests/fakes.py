"""Small random inputs shared by the model-level tests (imported as a sibling module)."""

import jax.numpy as jnp
import numpy as np

from semdiff import model as model_lib

V = 40  # vocabulary of the fake tokens; ids 4..V-1 are real tokens


def random_batch(seed=0, batch=12, length=16):
  """(tokens int32 [batch, length], mask bool [batch, length]): random lengths 0..length,
  random real tokens, padding 0."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, length + 1, batch)
  mask = np.arange(length)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, V, (batch, length)), 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask)


def small_insertion_model(gap_state=True):
  """A 2-layer, width-32 `InsertionTransformer` over the fake vocabulary."""
  return model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, gap_state=gap_state))
