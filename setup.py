"""Packaging for torch_xla_lora.

The Pallas kernel sources live in ``csrc_pallas/`` and nowhere else; they are
installed as the subpackage ``torch_xla_lora.kernels``.
"""

from setuptools import setup

# The verified stack: torch_xla's C++ extension is built against exactly this
# torch release, and torch_xla's JAX bridge (call_jax) needs torchax.
INSTALL_REQUIRES = [
    "torch==2.9.0",
    "torch_xla==2.9.0",
    "jax==0.7.1",
    "jaxlib==0.7.1",
    "torchax==0.0.7",
    "flax==0.12.0",  # torchax imports flax at import time
    "numpy",
    "safetensors",
    # The demo (the README's main job) builds a transformers Llama and checks it against PEFT.
    "peft>=0.21,<0.22",
    "transformers>=5,<6",
]

# libtpu: the release torch_xla 2.9.0's own `tpu` extra pins (its TPU runtime is
# built against it). It reads Mosaic IR up to version 7, which the kernels are
# written at (csrc_pallas/mosaic_version.py). The tests use its compiler without
# a TPU (tests/test_tpu_compile.py), so the test extra installs it too.
LIBTPU = "libtpu==0.0.21"

EXTRAS_REQUIRE = {
    "test": [
        LIBTPU,
        "pytest",
        "pytest-xdist",  # the suite runs in four worker processes (pytest.ini)
        "safetensors",
        "hypothesis",
        "ruff",
        "matplotlib",  # tests/test_bench_e2e.py runs the benchmark, which draws its heatmaps
    ],
    "bench": ["matplotlib"],
    "tpu": ["torch_xla[tpu]==2.9.0", LIBTPU],
}

setup(
    name="torch_xla_lora",
    version="0.1.0",
    description="Multi-LoRA serving for PyTorch/XLA: Pallas BGMV kernels, drop-in LoRA layers, PEFT adapters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "torch_xla_lora",
        "torch_xla_lora.ops",
        "torch_xla_lora.layers",
        "torch_xla_lora.bench",
        "torch_xla_lora.kernels",
    ],
    package_dir={"torch_xla_lora.kernels": "csrc_pallas"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
