"""How much of its input reaches the SPE output of a freshly initialised model.

    python -m benchmarks.init_signal [--images 16] [--sizes tiny ti]

For each model shape, initialisation scheme and LayerScale init, encodes real Fashion-MNIST test images and
the ten class names with a new model and prints, for the SPE output (the sequence representation the head
scores), the mean pairwise cosine between different inputs and the spread ||h_i - mean h|| / ||mean h||.
A cosine of 1.0000 means every input gets the same representation, so every candidate gets the same logit
and the classification loss starts (and stays) at ln(#classes). Needs the small data slice
(`python -m training.build_data --slice small`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from modeling_uniperceiver_moe.command_line import parse_script_arguments

SHAPES = {
    "tiny": dict(model_size=None, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                 patch_size=8, max_position_embeddings=64),  # the CPU main job
    "ti": dict(model_size="ti", image_size=224, max_position_embeddings=64),
    "b": dict(model_size="b", image_size=224, max_position_embeddings=64),
}
VARIANTS = [  # (initializer_scheme, layer_scale_init)
    ("fixed", 1e-3), ("fixed", 0.1), ("fixed", 1.0), ("fan_in", 1e-3), ("fan_in", 0.1), ("fan_in", 1.0),
]


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x.float(), dim=-1)
    n = len(x)
    return float(((x @ x.t()).sum() - n) / (n * n - n))


def spread(x: torch.Tensor) -> float:
    x = x.float()
    centre = x.mean(0)
    return float((x - centre).norm(dim=-1).mean() / centre.norm())


@torch.no_grad()
def spe_outputs(shape: dict, scheme: str, layer_scale: float, images, class_names: list[str], seed: int = 0):
    from modeling_uniperceiver_moe import UniPerceiverMoEConfig, UniPerceiverMoEForGenericPerception, UniPerceiverMoEProcessor

    config = UniPerceiverMoEConfig(**shape, initializer_scheme=scheme, layer_scale_init=layer_scale)
    torch.manual_seed(seed)
    model = UniPerceiverMoEForGenericPerception(config).eval()
    processor = UniPerceiverMoEProcessor.build(image_size=config.image_size)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(class_names, padding=True, return_tensors="pt")
    image_spe = model.uniperceiver(pixel_values=pixels).last_hidden_state[:, 0]
    text_spe = model.uniperceiver(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state[:, 0]
    return image_spe, text_spe


@dataclass
class InitSignalArguments:
    images: int = field(default=16, metadata={"help": "Fashion-MNIST test images fed through each new model"})
    sizes: list[str] = field(default_factory=lambda: ["tiny", "ti"], metadata={
        "choices": sorted(SHAPES), "help": "model shapes to measure"})
    data: str = field(default=os.path.join("data_cache", "small"), metadata={"help": "the data slice folder"})


def main(argv=None) -> list[dict]:
    args = parse_script_arguments(InitSignalArguments, argv, prog="python -m benchmarks.init_signal", description=__doc__)

    import json

    from training.data import StreamSpec, read_rows
    from training.tasks import decode_image

    with open(os.path.join(args.data, "manifest.json")) as handle:
        manifest = json.load(handle)
    source = manifest["sources"]["fashion_mnist"]
    files = [os.path.join(args.data, f["path"]) for f in source["splits"]["test"]["files"]]
    images = [decode_image(row["image"]) for row in read_rows(StreamSpec(files=files), args.images)]
    names = source["label_names"]
    rows = []
    print(f"{'shape':6s} {'init':7s} {'LayerScale':>10s} | {'image SPE cosine':>16s} {'spread':>8s} | "
          f"{'class-name SPE cosine':>21s} {'spread':>8s}")
    for size in args.sizes:
        for scheme, layer_scale in VARIANTS:
            image_spe, text_spe = spe_outputs(SHAPES[size], scheme, layer_scale, images, names)
            row = {"shape": size, "initializer_scheme": scheme, "layer_scale_init": layer_scale,
                   "image_cosine": mean_pairwise_cosine(image_spe), "image_spread": spread(image_spe),
                   "text_cosine": mean_pairwise_cosine(text_spe), "text_spread": spread(text_spe)}
            rows.append(row)
            print(f"{size:6s} {scheme:7s} {layer_scale:10g} | {row['image_cosine']:16.7f} {row['image_spread']:8.1e} | "
                  f"{row['text_cosine']:21.7f} {row['text_spread']:8.1e}")
    return rows


if __name__ == "__main__":
    main()
