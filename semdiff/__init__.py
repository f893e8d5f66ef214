"""semdiff: semantic diffusion language models in JAX/Flax.

``semdiff.generate(workdir_or_experiment, ...)`` samples from a trained model (see
`semdiff.generation`); it is imported on first use, so ``import semdiff`` stays cheap.
"""


def __getattr__(name):
  if name == "generate":
    from semdiff import generation  # pylint: disable=g-import-not-at-top
    return generation.generate
  raise AttributeError(f"module 'semdiff' has no attribute {name!r}")
