from setuptools import find_packages, setup


def get_requirements(path: str):
    return [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 inference: Meta's reference API, faithful and fast, on GPUs and CPUs",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=get_requirements("requirements.txt"),
    extras_require={
        "hf": ["safetensors"],  # Hugging Face checkpoints
        "server": ["fastapi>=0.165", "uvicorn>=0.30"],  # python -m llama.server
        "test": ["pytest", "safetensors", "transformers", "fastapi>=0.165", "uvicorn>=0.30", "httpx", "openai"],
    },
)
