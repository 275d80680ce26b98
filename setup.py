"""mixture-of-modules: Mixture-of-Modules transformers (Gong et al., EMNLP 2024), with Triton kernels.

The distribution is `mixture-of-modules`; it installs the import packages `mom` and `mom_kernels`."""
from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    README = f.read()

setup(
    name="mixture-of-modules",
    version="0.1.0",
    description="Mixture-of-Modules transformers: a PyTorch model layer and Triton routed-GEMM kernels",
    long_description=README,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mom", "mom.*", "mom_kernels", "mom_kernels.*"]),
    # torch >= 2.5: scaled_dot_product_attention's enable_gqa (grouped-query attention). The README's commands
    # pin torch==2.13.0, a CPU build on the project's machines; on CUDA install torch first (README, Install).
    # einops: head split/merge (mom.blocks); tokenizers: every BPE (mom.tokenizer); tqdm: progress bars.
    install_requires=["torch>=2.5", "triton>=3.0", "einops>=0.7", "numpy", "safetensors", "tqdm", "tokenizers>=0.15",
                      "matplotlib"],
    package_data={"mom": ["assets/*.txt"]},
    extras_require={
        # pytest-benchmark: benchmarks/test_bench.py; hypothesis: property tests; transformers: parity tests;
        # pytest-xdist: the suite on every core (-n auto).
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "transformers"],
        "flash": ["flash-attn"], "hf": ["transformers"],
    },
)
