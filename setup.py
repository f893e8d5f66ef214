"""semdiff: semantic diffusion language models in JAX/Flax."""

import setuptools

# Versions pinned to a set that installs and works together on Python 3.11
# (see README, "Pinned versions"). Golden-value tests depend on them.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "sentencepiece==0.2.3",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets needs it for custom builders but does not declare it.
    "importlib_resources>=6.0",
    "grain==0.2.18",
    "tensorboardX==2.6.5",
    "numpy>=1.26,<3",
]

setuptools.setup(
    name="semdiff",
    version="0.1.0",
    description="Semantic diffusion language models: coarse-to-fine text generation by parallel insertion.",
    packages=setuptools.find_packages(include=["semdiff", "semdiff.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest>=8", "pytest-xdist>=3.5", "chex==0.1.92",
            # tests/test_colabs.py runs the notebooks of colabs/ in a Jupyter kernel; the
            # notebooks plot with matplotlib (never imported by the library itself).
            "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2",
        ],
        # The benchmarks' and results script's PNG plots (they skip the plot without it).
        "plots": ["matplotlib==3.11.2"],
    },
)
