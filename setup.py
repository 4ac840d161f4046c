from setuptools import find_packages, setup

setup(
    name="ldm",
    version="0.1.0",
    description="Training framework for latent diffusion models, compatible with Stable Diffusion",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "pytorch-lightning>=2.0,<3",
        "omegaconf>=2.3",
        "einops",
        "transformers>=5.6",
        "safetensors",
        "open_clip_torch>=3.0",
        "ftfy",
        "webdataset",
        "scipy",
        "wandb",
        "tqdm",
        "Pillow",
        "numpy",
    ],
    extras_require={"test": ["pytest", "diffusers>=0.35", "peft", "lpips", "ruff"]},
)
