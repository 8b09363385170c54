"""Quick start: build, save, reload and fold a Ti-size attribute-MoE Uni-Perceiver, and report what was checked.

    python -m modeling_uniperceiver_moe.quickstart [--output-dir outputs/quickstart]

Runs offline on CPU in about a minute. Writes the checkpoint, its processor, the folded dense export and
`report.json`. (Multi-task pre-training on real data is `training/`.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoModel

from . import MOE_ROUTINGS, TokenAttributes, UniPerceiverMoEProcessor, fold_experts
from .command_line import parse_script_arguments


def sample_images(size: int) -> list[Image.Image]:
    """Two drawn pictures (a red disc, a blue square) as stand-in inputs for the shape check."""
    disc, square = Image.new("RGB", (size, size), "white"), Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(disc).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="red")
    ImageDraw.Draw(square).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="blue")
    return [disc, square]


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "where the model and its exports go"})
    routing: str = field(default="attribute", metadata={"choices": list(MOE_ROUTINGS), "help": "moe_routing of the model"})


def main(argv=None) -> dict:
    args = parse_script_arguments(QuickstartArguments, argv, prog="python -m modeling_uniperceiver_moe.quickstart",
                                  description=__doc__)
    torch.manual_seed(0)
    report = {}

    config = AutoConfig.for_model("uniperceiver_moe", model_size="ti", moe_routing=args.routing)
    model = AutoModel.from_config(config).eval()
    processor = UniPerceiverMoEProcessor.build(image_size=config.image_size)
    inputs = processor(text=["a red circle", "a blue square"], images=sample_images(config.image_size))
    image_text = TokenAttributes(input_vision=True, input_text=True, target_text=True, token_vision=True)
    inputs["attribute_vectors"] = image_text.to_tensor().expand(2, -1)
    inputs["task_ids"] = torch.zeros(2, dtype=torch.long)

    start = time.perf_counter()
    with torch.no_grad():
        before = model(**inputs, output_router_logits=True)
    report["forward_seconds_cpu"] = round(time.perf_counter() - start, 3)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["sequence_length"] = before.last_hidden_state.shape[1]
    report["moe_layers"] = config.moe_layer_indices()

    ckpt = os.path.join(args.output_dir, "checkpoint")
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    reloaded = AutoModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        after = reloaded(**inputs)
    report["reload_bit_identical"] = bool(torch.equal(before.last_hidden_state, after.last_hidden_state))

    if config.is_data_independent_routing:
        route = inputs["attribute_vectors"][:1] if args.routing == "attribute" else torch.tensor([0, 1])
        folded = fold_experts(model, route)
        folded_dir = os.path.join(args.output_dir, "folded")
        folded.save_pretrained(folded_dir)
        with torch.no_grad():
            dense_out = AutoModel.from_pretrained(folded_dir).eval()(**inputs).last_hidden_state
        report["folded_parameters"] = sum(p.numel() for p in folded.parameters())
        report["folded_max_abs_diff"] = float((dense_out - before.last_hidden_state).abs().max())

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    for key, value in report.items():
        print(f"{key:24s} {value}")
    return report


if __name__ == "__main__":
    main()
