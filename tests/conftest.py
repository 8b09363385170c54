import pytest
import torch

import modeling_uniperceiver_moe  # noqa: F401  (registers the Auto classes)
from modeling_uniperceiver_moe import TokenAttributes, UniPerceiverMoEConfig

ROUTINGS = ["none", "token", "context", "modality", "task", "attribute"]

IMAGE_INPUT = TokenAttributes.from_bits("10011000")
TEXT_INPUT = TokenAttributes.from_bits("01010100")


def tiny_config(routing="attribute", **overrides) -> UniPerceiverMoEConfig:
    """A 2-layer, 32-wide model on 16x16 images: builds in milliseconds."""
    values = dict(
        model_size=None, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8, num_frames=4, moe_routing=routing, moe_num_experts=4, moe_top_k=2, moe_layers="all",
        vocab_size=49411, max_position_embeddings=32, num_tasks=4,
    )
    values.update(overrides)
    return UniPerceiverMoEConfig(**values)


def make_batch(batch=3, words=5, seed=0, with_image=True, pad=True):
    """Text ids, a text padding mask, 16x16 images and per-sequence route keys."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49408, (batch, words), generator=g)
    mask = torch.ones(batch, words, dtype=torch.long)
    if pad:
        mask[0, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if with_image:
        inputs["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
    bits = [IMAGE_INPUT, TEXT_INPUT]
    inputs["attribute_vectors"] = torch.stack([bits[i % 2].to_tensor() for i in range(batch)])
    inputs["task_ids"] = torch.arange(batch) % 3
    return inputs


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """The tiny slice of every data source, built once per test session from the installed packages."""
    from training import build_data

    cache = tmp_path_factory.mktemp("data_cache")
    build_data.build_slice("tiny", str(cache), progress=False)
    return str(cache)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
