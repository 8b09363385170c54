from setuptools import find_packages, setup

setup(
    name="uniperceiver-moe",
    version="0.1.0",
    description="Uni-Perceiver-MoE (conditional mixture-of-experts generalist model) for Hugging Face transformers",
    packages=find_packages(include=["modeling_uniperceiver_moe*", "training*", "prompt_tuning*", "hub_cards*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.10",
        "transformers>=5.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "datasets>=4.0",
        "peft>=0.21,<0.22",  # prompt_tuning/adapter.py registers into PEFT internals
        "evaluate>=0.4",
        "ftfy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        # data recipes (training/build_data.py): R data of janeaustenr, the sample videos' decoder
        "rdata",
        "av",
        "sacrebleu",
    ],
    extras_require={"test": ["pytest>=8"]},
)
