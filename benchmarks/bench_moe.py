"""Side-by-side speed of dense vs conditional-MoE encoders, measured in ONE run.

    python -m benchmarks.bench_moe --size b --batch 64 --dtype bf16        # GPU
    python -m benchmarks.bench_moe --size tiny --batch 4 --steps 2          # CPU, correctness-sized

Prints one table: training step (forward + backward + AdamW) tokens/s and peak memory for dense, each
routing and a naive per-expert loop (Mixtral-style) of the same MoE layer; inference tokens/s for
dense, attribute-routed and the folded (re-parameterised) model. Ratios are to dense of the same run.
`--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from modeling_uniperceiver_moe import (
    TokenAttributes,
    UniPerceiverMoEConfig,
    UniPerceiverMoEForGenericPerception,
    UniPerceiverMoELinear,
    fold_experts,
)
from modeling_uniperceiver_moe.routing import MergedDispatch

CAPTION_IMAGE = TokenAttributes.from_bits("11011000")
CAPTION_TEXT = TokenAttributes.from_bits("11010101")
CLASS_INPUT = TokenAttributes.from_bits("10011000")


def naive_moe_linear_forward(self: UniPerceiverMoELinear, x: torch.Tensor, dispatch) -> torch.Tensor:
    """Reference: a Python loop over experts, each gathering its tokens (Mixtral-style). Same maths."""
    if isinstance(dispatch, MergedDispatch):
        groups = dispatch.groups
        gates = dispatch.gates[groups.sorted_group if dispatch.rows_sorted else groups.token_group]  # [N, E]
        token_expert = gates.nonzero(as_tuple=True)
        tokens, experts, weights = token_expert[0], token_expert[1], gates[token_expert]
    else:
        tokens, experts, weights = dispatch.token_index, dispatch.expert_index, dispatch.weight
    out = torch.zeros(x.shape[0], self.out_features, device=x.device, dtype=x.dtype)
    for e in range(self.num_experts):
        chosen = experts == e
        idx = tokens[chosen]
        y = torch.nn.functional.linear(x[idx], self.weight[e].to(x.dtype), self.bias[e].to(x.dtype))
        out.index_add_(0, idx, y * weights[chosen].to(x.dtype)[:, None])
    return out


@contextlib.contextmanager
def naive_experts():
    original = UniPerceiverMoELinear.forward
    UniPerceiverMoELinear.forward = naive_moe_linear_forward
    try:
        yield
    finally:
        UniPerceiverMoELinear.forward = original


def make_config(size: str, routing: str, experts: int, top_k: int, image_size: int) -> UniPerceiverMoEConfig:
    if size == "tiny":
        return UniPerceiverMoEConfig(model_size=None, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=image_size, moe_routing=routing, moe_num_experts=experts, moe_top_k=top_k)
    return UniPerceiverMoEConfig(model_size=size, image_size=image_size, moe_routing=routing,
                                 moe_num_experts=experts, moe_top_k=top_k)


def make_inputs(config, batch: int, words: int, device, dtype):
    """A mixed batch: half image classification (one attribute), half captioning (image + text attributes).

    Captioning sequences are `[SPE] image words placeholders`; class-name candidates are short texts.
    """
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g).to(device, dtype)
    ids = torch.randint(0, 49408, (batch, words), generator=g).to(device)
    vision = (config.image_size // config.patch_size) ** 2
    length = 1 + vision + 2 * words
    attrs = torch.empty(batch, length, 8)
    attrs[:, : 1 + vision] = CAPTION_IMAGE.to_tensor()
    attrs[:, 1 + vision :] = CAPTION_TEXT.to_tensor()
    attrs[: batch // 2] = CLASS_INPUT.to_tensor()
    inputs = dict(pixel_values=pixels, input_ids=ids, caption_mode=True, attribute_vectors=attrs.to(device),
                  task_ids=(torch.arange(batch) % 2).to(device), query_positions=None)
    candidates = torch.randint(0, 49408, (256, 4), generator=g).to(device)
    inputs.update(target_input_ids=candidates, target_attribute_vectors=torch.tensor([TokenAttributes.from_bits("11010110").to_list()], device=device).expand(256, 8),
                  target_task_ids=torch.zeros(256, dtype=torch.long, device=device),
                  labels=ids % 256, task_family="captioning")
    return inputs, batch * length + 256 * (1 + 4)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(model, inputs, tokens, device, dtype, warmup, steps, train: bool):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with autocast:
                model(**inputs)
    seconds = time_it(step, device, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return tokens / seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="b", choices=["tiny", "ti", "s", "b", "l"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--routings", default="none,token,context,modality,task,attribute,token-naive,attribute-naive")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    rows = []
    base_config = make_config(args.size, "none", args.experts, 2, args.image_size)
    inputs, tokens = make_inputs(base_config, args.batch, args.words, device, dtype)
    print(f"device={device} dtype={dtype} size={args.size} batch={args.batch} tokens/step={tokens}")

    def run(name, model, train, naive=False):
        with naive_experts() if naive else contextlib.nullcontext():
            rate, peak = measure(model, inputs, tokens, device, dtype, args.warmup, args.steps, train)
        rows.append({"phase": "train" if train else "infer", "model": name, "tokens_per_s": rate, "peak_gib": peak})
        print(f"  {rows[-1]['phase']:5s} {name:18s} {rate:12.0f} tok/s  peak {peak:6.2f} GiB", flush=True)

    for routing in args.routings.split(","):
        name = routing.replace("-naive", "")
        torch.manual_seed(0)
        model = UniPerceiverMoEForGenericPerception(make_config(args.size, name, args.experts, 2, args.image_size)).to(device)
        run(routing, model, train=True, naive=routing.endswith("naive"))
        if routing in ("none", "attribute"):
            run(routing, model, train=False)
        if routing == "attribute":
            routes = torch.stack([a.to_tensor() for a in (CLASS_INPUT, CAPTION_IMAGE, CAPTION_TEXT, TokenAttributes.from_bits("11010110"))])
            run("attribute-folded", fold_experts(model, routes.to(device)).to(device), train=False)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = {r["phase"]: r["tokens_per_s"] for r in rows if r["model"] == "none"}
    print("\n| phase | model | tokens/s | time vs dense | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        ratio = dense[r["phase"]] / r["tokens_per_s"] if r["phase"] in dense else float("nan")
        r["time_vs_dense"] = ratio
        print(f"| {r['phase']} | {r['model']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {r['peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": str(device), "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
