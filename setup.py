from setuptools import find_packages, setup

setup(
    name="paddle_ernie5",
    version="0.1.0",
    description=(
        "A PaddlePaddle-native reproduction of ERNIE 5.0: unified ultra-sparse MoE, "
        "elastic training, RL post-training, FlashMask attention"
    ),
    packages=find_packages(include=["paddle_ernie5", "paddle_ernie5.*"]),
    python_requires=">=3.10",
    install_requires=[
        # paddlepaddle (CPU) or paddlepaddle-gpu: installed by the Makefile / the user, see README
        "matplotlib",  # routing heatmaps and reports
        "numpy",
        "Pillow",  # `ernie5 generate` writes images
        "PyYAML",
        "safetensors",
        "scikit-learn",  # the digits data set
        "scipy",  # audio resampling
        "sentencepiece",
        "tqdm",
        "visualdl",
    ],
    extras_require={"bench": ["torch==2.13.0"]},
    entry_points={"console_scripts": ["ernie5=paddle_ernie5.cli:main"]},
)
