import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    text = (HERE / "mmgen_pytorch" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("could not find __version__ in mmgen_pytorch/__init__.py")
    return match.group(1)


HUB = ["huggingface_hub>=0.26"]  # save_pretrained / from_pretrained / push_to_hub (imported on first use)
# python -m mmgen_pytorch.train: Accelerate runs the loop, YAML configs, ema-pytorch's EMA, Pillow's images / grids
TRAIN = ["accelerate", "pyyaml", "ema-pytorch", "Pillow"]
# mmgen_pytorch.evaluation: torchmetrics computes FID / IS, numpy writes the statistics caches (imported on first use);
# the standard FID Inception is torch-fidelity's (which needs torchvision)
EVAL = ["torchmetrics>=1.4", "numpy"]
# what examples/ needs beside the library: the digits job trains through the entry point (TRAIN) and scores with
# scikit-learn / SciPy; the tests run the examples, the notebook extra adds a Jupyter
EXAMPLES = [*TRAIN, *EVAL, "scikit-learn", "scipy"]
INCEPTION = [*EVAL, "torch-fidelity"]

readme = HERE / "README.md"
long_description = readme.read_text(encoding="utf-8") if readme.exists() else ""

setup(
    name="mmgen-pytorch",
    version=read_version(),
    description="Transfusion and its siblings on one shared transformer backbone, in PyTorch",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(exclude=["tests*", "benchmarks*", "examples*"]),
    package_data={"mmgen_pytorch": ["configs/*.yaml"]},  # the named training configs
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.12",
        "einops>=0.8",
        "beartype",
        "jaxtyping",
        "torchdiffeq",
        "rotary-embedding-torch>=0.8",
        "x-transformers",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": [*EXAMPLES, *HUB, "pytest", "pytest-xdist", "hypothesis", "nbformat", "nbclient", "ipykernel",
                 "setuptools>=61", "wheel"],  # the wheel test builds without isolation (Python 3.12+ venvs lack them)
        "examples": EXAMPLES,
        "hub": HUB,
        "train": TRAIN,
        "eval": EVAL,
        "inception": INCEPTION,
        "data": ["Pillow"],  # mmgen_pytorch.data reads images with it (imported on first use)
        "notebook": [*EXAMPLES, "notebook", "ipywidgets"],
    },
    keywords=["artificial intelligence", "deep learning", "transformers", "multimodal", "diffusion", "flow matching"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
