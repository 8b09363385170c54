"""Side-by-side speed of dense vs conditional-MoE encoders, measured in ONE run.

    python -m benchmarks.bench_moe --sizes ti,b --micro --compile none,attribute,token --json out.json   # GPU
    python -m benchmarks.bench_moe --sizes tiny --batch 2 --image-size 32 --steps 1 --warmup 0           # CPU

Prints: the measured bf16 matmul ceiling; a microbenchmark of the MoE linear alone against a dense
linear of equal active FLOPs (TFLOP/s); then per size, training step (forward + backward + fused
AdamW) tokens/s and peak memory for dense, each routing, the naive reference (`-naive`: the eager
experts implementation, a Python loop over route groups or experts) and the ablations `attribute-unsorted` (a permutation per expert projection, not
per layer), `attribute-unique` (route keys found by a row sort) and `attribute-unfused` (the expert merge as
GEMMs, not the fused Triton kernels), `token-argsort` (rows put in expert or route-group order by a
comparison sort instead of the counting sort), `token-topk` (compiled gates' top-k by `torch.topk`),
`token-passcast` (each encoder pass casts its own experts); `-top1` picks one expert instead of two
(`token-top1-unsorted`: without the top-1 MLP kept in expert order); inference
tokens/s for dense, token/context/attribute routing and the folded (re-parameterised) export. Ratios
are to dense of the same size, phase and compilation, in the same process. `--json PATH` writes all.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch

from modeling_uniperceiver_moe import (
    UniPerceiverMoEConfig,
    UniPerceiverMoEForGenericPerception,
    UniPerceiverMoELinear,
    fold_experts,
)
from modeling_uniperceiver_moe import UniPerceiverMoEModel
from modeling_uniperceiver_moe.command_line import parse_script_arguments
from modeling_uniperceiver_moe.modeling_uniperceiver_moe import UniPerceiverMoEMLP
from modeling_uniperceiver_moe.routing import MergedDispatch, RouteGroups, build_token_dispatch, select_top_k
from training.tasks import ATTRIBUTES  # the task registry's attribute vectors

CAPTION_IMAGE = ATTRIBUTES["caption_image"]
CAPTION_TEXT = ATTRIBUTES["caption_text"]
CLASS_INPUT = ATTRIBUTES["classification_input"]
CANDIDATE = ATTRIBUTES["word_target"]


@contextlib.contextmanager
def naive_experts():
    """The naive reference: the model's eager experts implementation (a Python loop with one matmul per
    route group, or per expert for token routing: `UniPerceiverMoELinear.eager_merged_forward` /
    `eager_token_forward`), whatever the model's `experts_implementation`, and no rows kept sorted
    (`unsorted_layers`)."""
    from modeling_uniperceiver_moe import modeling_uniperceiver_moe as modeling

    with mock.patch.object(modeling, "experts_implementation", lambda config: "eager"), unsorted_layers():
        yield


def argsort_dispatch():
    """Ablation (`token-argsort`): rows put in group/expert order by a stable argsort instead of the
    counting sort (`routing.stable_group_order`)."""
    from modeling_uniperceiver_moe import routing

    return mock.patch.object(routing, "MAX_COUNTING_SORT_GROUPS", -1)


def make_config(size: str, routing: str, experts: int, top_k: int, image_size: int) -> UniPerceiverMoEConfig:
    if size == "tiny":
        return UniPerceiverMoEConfig(model_size=None, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=image_size, moe_routing=routing, moe_num_experts=experts, moe_top_k=top_k)
    return UniPerceiverMoEConfig(model_size=size, image_size=image_size, moe_routing=routing,
                                 moe_num_experts=experts, moe_top_k=top_k)


ROUTE_INPUTS = ("attribute_vectors", "task_ids", "target_attribute_vectors", "target_task_ids")


def make_inputs(config, batch: int, words: int, device, dtype, kind: str = "mixed", host_route_keys: bool = False):
    """kind "mixed": half image classification (one attribute), half captioning (image + text attributes);
    captioning sequences are `[SPE] image words placeholders`. kind "classification": one task, every
    sequence `[SPE] image` with one attribute (each encoder pass then has a single route group).
    Either way 256 class-name candidates (short texts, their own attribute) are encoded in a second pass.
    host_route_keys: the route inputs (`ROUTE_INPUTS`) stay on the CPU, as the task registry builds them
    (the model then reads them without waiting for the GPU); everything else goes to `device`.
    """
    inputs, tokens = _make_inputs(config, batch, words, device, dtype, kind)
    if host_route_keys:
        inputs = {k: v.cpu() if k in ROUTE_INPUTS else v for k, v in inputs.items()}
    return inputs, tokens


def _make_inputs(config, batch: int, words: int, device, dtype, kind: str):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g).to(device, dtype)
    if kind == "classification":
        vision = 1 + (config.image_size // config.patch_size) ** 2
        inputs = dict(pixel_values=pixels, attribute_vectors=CLASS_INPUT.to_tensor().expand(batch, vision, 8).to(device),
                      task_ids=torch.zeros(batch, dtype=torch.long, device=device), labels=torch.arange(batch, device=device) % 256,
                      task_family="image_classification")
        return _with_candidates(inputs, g, device), batch * vision + 256 * (1 + 4)
    if kind != "mixed":
        raise ValueError(f"unknown input kind {kind!r}: use 'mixed' or 'classification'")
    ids = torch.randint(0, 49408, (batch, words), generator=g).to(device)
    vision = (config.image_size // config.patch_size) ** 2
    length = 1 + vision + 2 * words
    attrs = torch.empty(batch, length, 8)
    attrs[:, : 1 + vision] = CAPTION_IMAGE.to_tensor()
    attrs[:, 1 + vision :] = CAPTION_TEXT.to_tensor()
    attrs[: batch // 2] = CLASS_INPUT.to_tensor()
    inputs = dict(pixel_values=pixels, input_ids=ids, caption_mode=True, attribute_vectors=attrs.to(device),
                  task_ids=(torch.arange(batch) % 2).to(device), query_positions=None, labels=ids % 256,
                  task_family="captioning")
    return _with_candidates(inputs, g, device), batch * length + 256 * (1 + 4)


def _with_candidates(inputs: dict, g: torch.Generator, device) -> dict:
    """Add 256 candidate texts of 4 tokens (CANDIDATE attribute, task 0) to `inputs`."""
    candidates = torch.randint(0, 49408, (256, 4), generator=g).to(device)
    return dict(inputs, target_input_ids=candidates, target_task_ids=torch.zeros(256, dtype=torch.long, device=device),
                target_attribute_vectors=torch.tensor([CANDIDATE.to_list()], device=device).expand(256, 8))


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


def compile_encoder(model, mode: str | None = None, layers_per_graph: int = 0) -> None:
    """Compile the encoder (spans of `layers_per_graph` layers; 0: the whole stack) with static shapes: the
    benchmark's batch never changes shape."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.compile_encoder(layers_per_graph=layers_per_graph or None, dynamic=False, mode=mode)


@contextlib.contextmanager
def unsorted_layers():
    """Ablation / naive reference: rows are permuted per expert projection, not once per layer
    (data-independent routings) or once per MLP (top-1 token routing, `UniPerceiverMoEMLP.keeps_expert_order`)."""
    original = UniPerceiverMoEModel._routing_state

    def routing_state(self, *args):
        state = original(self, *args)
        state.sorted_rows = None
        return state

    with mock.patch.object(UniPerceiverMoEModel, "_routing_state", routing_state), \
            mock.patch.object(UniPerceiverMoEMLP, "keeps_expert_order", lambda self, dispatch: False):
        yield


@contextlib.contextmanager
def sorted_route_keys():
    """Ablation (`attribute-unique`): route keys found by `torch.unique` (a sort over whole rows) instead
    of integer codes, and the cached inference merge not marked as fixed-address CUDA-graph input. (The
    passes still take their groups from the table's reading, as the default path does.)"""
    from modeling_uniperceiver_moe import modeling_uniperceiver_moe as modeling, routing

    def unique_keys(token_keys, num_ids=None, return_groups=False, name="route"):
        return torch.unique(token_keys, dim=0, return_inverse=return_groups)

    def unique_tables(all_token_keys, num_ids=None, return_groups=False, name="route"):
        return [unique_keys(token_keys, return_groups=return_groups) for token_keys in all_token_keys]

    originals = routing.distinct_route_keys, modeling.distinct_route_key_tables, modeling._mark_static_addresses
    routing.distinct_route_keys, modeling.distinct_route_key_tables = unique_keys, unique_tables
    modeling._mark_static_addresses = lambda merged: None
    try:
        yield
    finally:
        routing.distinct_route_keys, modeling.distinct_route_key_tables, modeling._mark_static_addresses = originals


def torch_topk_gates():
    """Ablation (`token-topk`): compiled token/context gates pick their experts with `torch.topk` instead of
    max-reductions (`routing.top_k_by_max`)."""
    from modeling_uniperceiver_moe import routing

    return mock.patch.object(routing, "top_k_by_max", lambda probs, top_k: probs.topk(top_k, dim=-1))


def per_pass_casts():
    """Ablation (`token-passcast`): every encoder pass casts its own float32 experts to bf16 (and, in
    training, casts their gradients back) instead of one kept cast per parameter update
    (`UniPerceiverMoEModel.cast_experts`)."""
    return mock.patch.object(UniPerceiverMoEModel, "cast_experts", lambda self, dtype: None)


def unfused_merge():
    """Ablation (`attribute-unfused`): the expert merge as float32 GEMMs and casts instead of the fused
    Triton kernels (the path CPU always takes)."""
    from modeling_uniperceiver_moe import merge_kernels

    return merge_kernels.disabled()


# variant flag -> the context it runs in (the naive reference or an ablation; the first listed flag wins)
ABLATIONS = {"naive": naive_experts, "unsorted": unsorted_layers, "unique": sorted_route_keys, "unfused": unfused_merge,
             "argsort": argsort_dispatch, "topk": torch_topk_gates, "passcast": per_pass_casts}


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


# ------------------------------------------------------------------------------------------ microbenchmark
def matmul_ceiling(device, dtype, size: int) -> float:
    """Measured TFLOP/s of one large square matmul: the card's practical ceiling for this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_it(lambda: a @ b, device, 3, 10)
    return 2 * size**3 / seconds / 1e12


def linear_microbenchmark(config, tokens: int, device, dtype, warmup: int, steps: int) -> list[dict]:
    """The MoE linear alone (B's fc1 shape) against a dense linear of the same active FLOPs, fwd + bwd.

    * merged: 3 route groups of equal size, rows already sorted (as inside a layer), weights merged
      from E experts every step (training): same FLOPs as a dense linear on the same rows.
    * token top-2: every token to 2 of E experts (random router), grouped GEMM over 2N assignments:
      compared with a dense linear on 2N rows (equal active FLOPs).
    * kernel only: `grouped_mm` with E equal groups vs one `mm`, forward, same FLOPs.
    """
    d_in, d_out, experts = config.hidden_size, config.intermediate_size, config.moe_num_experts
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = []

    def fwd_bwd(module, x, make_dispatch=None):
        def step():
            with autocast:
                out = module(x) if make_dispatch is None else module(x, make_dispatch())
            out.float().sum().backward()
        return step

    def add(name, fn, flops, baseline=None):
        seconds = time_it(fn, device, warmup, steps)
        rows.append({"case": name, "tflops": flops / seconds / 1e12, "ms": seconds * 1e3, "baseline": baseline})

    for factor in (1, 2):
        dense = torch.nn.Linear(d_in, d_out).to(device)
        x = torch.randn(factor * tokens, d_in, generator=g).to(device).requires_grad_()
        add(f"dense linear, {factor}N rows", fwd_bwd(dense, x), 6 * factor * tokens * d_in * d_out)
    moe = UniPerceiverMoELinear(d_in, d_out, experts).to(device)
    torch.nn.init.normal_(moe.weight, std=0.02)
    x = torch.randn(tokens, d_in, generator=g).to(device).requires_grad_()
    keys = torch.arange(3).repeat_interleave(-(-tokens // 3))[:tokens].to(device)
    groups = RouteGroups.from_keys(keys)
    gate_logits = torch.randn(3, experts, generator=g).to(device).requires_grad_()

    def merged():  # the gates are re-computed every step, as in training (the merge back-propagates into them)
        decision = select_top_k(gate_logits, 2, 0.0, training=False)
        return MergedDispatch(decision.dense_weights(experts), groups, decision, rows_sorted=True)

    add("MoE linear, merged, one grouped GEMM", fwd_bwd(moe, x, merged), 6 * tokens * d_in * d_out, "dense linear, 1N rows")
    router_logits = torch.randn(tokens, experts, generator=g).to(device)
    token_dispatch = build_token_dispatch(select_top_k(router_logits, 2, 0.0, training=False), experts, None)
    add("MoE linear, token top-2", fwd_bwd(moe, x, lambda: token_dispatch), 12 * tokens * d_in * d_out,
        "dense linear, 2N rows")

    if device.type == "cuda":
        kernel_dtype = torch.bfloat16
        a = torch.randn(tokens, d_in, generator=g).to(device, kernel_dtype)
        w = torch.randn(d_out, d_in, generator=g).to(device, kernel_dtype)
        ws = torch.randn(experts, d_in, d_out, generator=g).to(device, kernel_dtype)
        per = tokens // experts // 16 * 16
        offs = torch.tensor([per * (e + 1) for e in range(experts - 1)] + [tokens], dtype=torch.int32, device=device)
        add("kernel: mm", lambda: a @ w.t(), 2 * tokens * d_in * d_out)
        add("kernel: grouped_mm, E groups", lambda: torch.nn.functional.grouped_mm(a, ws, offs=offs),
            2 * tokens * d_in * d_out, "kernel: mm")
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        r["vs_baseline"] = r["tflops"] / by_case[r["baseline"]]["tflops"] if r["baseline"] else float("nan")
    return rows


# ------------------------------------------------------------------------------------------ main
@dataclass
class BenchMoEArguments:
    sizes: str = field(default="b", metadata={"aliases": ["--size"], "help": "comma-separated: tiny, ti, s, b, l"})
    batch: int = field(default=64, metadata={"help": "images per step"})
    words: int = field(default=20, metadata={"help": "caption words per image"})
    image_size: int = field(default=224, metadata={"help": "input resolution"})
    experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    inputs: str = field(default="mixed", metadata={
        "choices": ["mixed", "classification"],
        "help": "mixed classification + captioning batch, or one-task image classification (see make_inputs)"})
    host_route_keys: bool = field(default=False, metadata={
        "help": "keep the route inputs (attribute vectors, task ids) on the CPU (see make_inputs)"})
    dtype: str = field(default="bf16", metadata={"choices": ["bf16", "fp32"], "help": "autocast dtype"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first"})
    steps: int = field(default=10, metadata={"help": "timed steps"})
    routings: str = field(default="none,token,context,modality,task,attribute,token-naive,attribute-naive,attribute-unsorted",
                          metadata={"help": "training variants, comma-separated"})
    infer_routings: str = field(default="none,token,context,attribute,attribute-folded",
                                metadata={"help": "inference variants, comma-separated"})
    compile: str = field(default="", metadata={
        "help": "routings (and 'attribute-folded') also run with the encoder compiled (see --compile-mode, --compile-layers-per-graph)"})
    compile_mode: Optional[str] = field(default=None, metadata={"help": "torch.compile mode, e.g. reduce-overhead (CUDA graphs)"})
    compile_layers_per_graph: int = field(default=0, metadata={
        "help": "consecutive layers in one compiled call (1: each layer; 0: the whole encoder)"})
    compiled_only: bool = field(default=False, metadata={"help": "variants listed in --compile run compiled only (no eager run)"})
    micro: bool = field(default=False, metadata={"help": "also run the MoE-linear microbenchmark"})
    bf16_inference_weights: bool = field(default=False, metadata={
        "help": "inference with the model cast to bf16 (as `from_pretrained(..., dtype=torch.bfloat16)`), dense and MoE "
                "alike, so no float32 -> bf16 weight casts per forward; training keeps float32 (CUDA only)"})
    repeats: int = field(default=1, metadata={"help": "measure every variant this many times (interleaved); report medians"})
    json: Optional[str] = field(default=None, metadata={"help": "also write the results here"})
    table: Optional[str] = field(default=None, metadata={
        "help": "measure nothing: print the table of a log written by --json (the tables of docs/benchmarks.md)"})


def main(argv=None):
    args = parse_script_arguments(BenchMoEArguments, argv, prog="python -m benchmarks.bench_moe", description=__doc__)
    if args.table:
        with open(args.table, encoding="utf-8") as handle:
            print(markdown_table(json.load(handle)["rows"]))
        return []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32
    compiled = {r for r in args.compile.split(",") if r}
    report = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": [], "micro": {}}
    rows = report["rows"]
    if args.micro:
        ceiling = matmul_ceiling(device, dtype, 8192 if device.type == "cuda" else 256)
        report["matmul_ceiling_tflops"] = ceiling
        print(f"{dtype} matmul ceiling (one square GEMM): {ceiling:.1f} TFLOP/s")
    for size in args.sizes.split(","):
        base_config = make_config(size, "none", args.experts, 2, args.image_size)
        inputs, tokens = make_inputs(base_config, args.batch, args.words, device, dtype, args.inputs, args.host_route_keys)
        print(f"\ndevice={report['device']} dtype={dtype} size={size} inputs={args.inputs} batch={args.batch} "
              f"tokens/step={tokens} route keys on the {'host' if args.host_route_keys else 'device'}", flush=True)
        if args.micro:
            micro = linear_microbenchmark(make_config(size, "token", args.experts, 2, args.image_size), tokens,
                                          device, dtype, args.warmup, args.steps)
            report["micro"][size] = micro
            for r in micro:
                share = r["tflops"] / report["matmul_ceiling_tflops"]
                print(f"  micro {r['case']:32s} {r['tflops']:8.1f} TFLOP/s ({share:.0%} of ceiling)"
                      + (f"  {r['vs_baseline']:.2f} of {r['baseline']}" if r["baseline"] else ""), flush=True)

        def run(name, model, train, context=contextlib.nullcontext, compile_it=False):
            if compile_it:
                compile_encoder(model, args.compile_mode, args.compile_layers_per_graph)
            try:
                with context():
                    rate, peak = measure(model, inputs, tokens, device, dtype, args.warmup, args.steps, train)
            except Exception as error:  # a variant that cannot run here is reported, not fatal
                print(f"  {'train' if train else 'infer'} {name}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
                traceback.print_exc(limit=-6)  # the innermost frames, on stderr
                return
            rows.append({"size": size, "phase": "train" if train else "infer", "model": name,
                         "compiled": compile_it, "tokens_per_s": rate, "peak_gib": peak})
            label = name + (" +compile" if compile_it else "")
            graphs = ""
            if compile_it:  # cumulative over the run: a graph break splits the encoder and costs host time
                counters = torch._dynamo.utils.counters
                graphs = f"  (so far: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph breaks)"
            print(f"  {rows[-1]['phase']:5s} {label:26s} {rate:12.0f} tok/s  peak {peak:6.2f} GiB{graphs}", flush=True)

        variants = [v for v in dict.fromkeys(args.routings.split(",") + args.infer_routings.split(",")) if v]
        for variant in [v for _ in range(args.repeats) for v in variants]:  # repeats interleave variants
            routing = variant.split("-")[0]
            flags = set(variant.split("-")[1:])  # top1 / naive / unsorted / unique / unfused / argsort / topk / passcast / folded
            top_k = 1 if "top1" in flags else 2
            context = next((ABLATIONS[flag] for flag in ABLATIONS if flag in flags), contextlib.nullcontext)
            modes = ((True,) if args.compiled_only else (False, True)) if variant in compiled else (False,)
            for compile_it in modes:
                torch.manual_seed(0)
                model = UniPerceiverMoEForGenericPerception(make_config(size, routing, args.experts, top_k, args.image_size)).to(device)
                if "folded" in flags:
                    routes = torch.stack([a.to_tensor() for a in (CLASS_INPUT, CAPTION_IMAGE, CAPTION_TEXT, CANDIDATE)])
                    model = fold_experts(model, routes.to(device)).to(device)
                elif variant in args.routings.split(","):
                    run(variant, model, True, context, compile_it)
                if variant in args.infer_routings.split(","):
                    if args.bf16_inference_weights and device.type == "cuda":
                        model = model.to(torch.bfloat16)
                    run(variant, model, False, context, compile_it)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if device.type == "cuda":
            torch._dynamo.reset()
    report["runs"] = rows[:]
    rows[:] = median_rows(rows)
    add_time_vs_dense(rows)
    print("\n" + markdown_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (size, phase, model, compiled): the median tokens/s (and max peak) over repeats."""
    grouped: dict[tuple, list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["size"], r["phase"], r["model"], r["compiled"]), []).append(r)
    merged = []
    for runs in grouped.values():
        rates = sorted(r["tokens_per_s"] for r in runs)
        merged.append({**runs[0], "tokens_per_s": rates[len(rates) // 2], "repeats": len(runs),
                       "spread": rates[-1] / rates[0], "peak_gib": max(r["peak_gib"] for r in runs)})
    return merged


def add_time_vs_dense(rows: list[dict]) -> None:
    """Sets each row's "time vs dense": dense tokens/s / the row's tokens/s, same size, phase and compilation."""
    dense = {(r["size"], r["phase"], r["compiled"]): r["tokens_per_s"] for r in rows if r["model"] == "none"}
    for r in rows:
        base = dense.get((r["size"], r["phase"], r["compiled"]))
        r["time_vs_dense"] = base / r["tokens_per_s"] if base else float("nan")


def markdown_table(rows: list[dict]) -> str:
    """The median rows (with their "time vs dense") as a markdown table."""
    lines = ["| size | phase | model | compiled | tokens/s (median) | time vs dense | max/min over repeats | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['phase']} | {r['model']} | {'yes' if r['compiled'] else 'no'} | "
              f"{r['tokens_per_s']:.0f} | {r['time_vs_dense']:.2f}x | {r['spread']:.2f} | {r['peak_gib']:.2f} |"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
