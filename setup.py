from setuptools import find_packages, setup

# `pip install uniperceiver-moe` is what loading and running the model needs; the rest comes as extras.
EXTRAS = {
    # training/: Accelerate trainer, streamed datasets, YAML configs, curves and TensorBoard logs
    "train": ["accelerate>=1.0", "datasets>=4.0", "pyyaml", "matplotlib", "tensorboard"],
    # training/build_data.py: R data of janeaustenr, the sample videos' decoder
    "data": ["datasets>=4.0", "rdata", "av"],
    # prompt_tuning/: the PEFT adapter (it registers into PEFT internals) and the offline evaluate metrics
    "prompt": ["peft>=0.21,<0.22", "evaluate>=0.4", "sacrebleu", "accelerate>=1.0", "datasets>=4.0"],
    # hub_cards/: cards, push and the reference converter
    "hub": ["peft>=0.21,<0.22"],
}
EXTRAS["all"] = sorted({requirement for group in EXTRAS.values() for requirement in group})
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=8"]

setup(
    name="uniperceiver-moe",
    version="0.1.0",
    description="Uni-Perceiver-MoE (conditional mixture-of-experts generalist model) for Hugging Face transformers",
    packages=find_packages(include=["modeling_uniperceiver_moe*", "training*", "prompt_tuning*", "hub_cards*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.10",
        "transformers>=5.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "ftfy",  # the tokenizer's text repair, as open_clip's
        "pillow",
        "tqdm",
    ],
    extras_require=EXTRAS,
)
