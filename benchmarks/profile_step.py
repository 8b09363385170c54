"""Where the time goes: torch.profiler tables of one model training step, or of the MoE linear alone.

    python -m benchmarks.profile_step --size b --routing attribute --batch 64
    python -m benchmarks.profile_step --size b --linear merged      # or: token, dense
    python -m benchmarks.profile_step --size b --routing attribute --compile   # compiled layers
    python -m benchmarks.profile_step --size b --routing attribute --infer     # an inference forward
    python -m benchmarks.profile_step --size b --routing token --top-k 1       # top-1 token routing

Prints the wall time and the summed GPU kernel time per step first (GPU time well below wall time
means the step is host-bound), then the ops sorted by their own device time.
"""

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moe import compile_encoder, make_config, make_inputs
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoELinear
from modeling_uniperceiver_moe.command_line import parse_script_arguments
from modeling_uniperceiver_moe.routing import MergedDispatch, RouteGroups, build_token_dispatch, select_top_k


def model_step(args, device, dtype):
    config = make_config(args.size, args.routing, 8, args.top_k, args.image_size)
    model = UniPerceiverMoEForGenericPerception(config).to(device).train(not args.infer)
    if args.infer and args.bf16_weights:
        model = model.to(torch.bfloat16)
    if args.compile:
        compile_encoder(model, args.compile_mode, args.compile_layers_per_graph)
    inputs, _ = make_inputs(config, args.batch, 20, device, dtype, args.inputs, args.host_route_keys)
    if args.infer:
        @torch.no_grad()
        def infer():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(**inputs)

        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def linear_step(args, device, dtype):
    """Forward + backward of one projection (the size's fc1) on the workload's token count."""
    config = make_config(args.size, "none", 8, 2, args.image_size)
    tokens = args.batch * (1 + (args.image_size // config.patch_size) ** 2 + 40) + 256 * 5
    d_in, d_out = config.hidden_size, config.intermediate_size
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    if args.linear == "dense":
        layer = torch.nn.Linear(d_in, d_out).to(device)
        make_dispatch = None
    else:
        layer = UniPerceiverMoELinear(d_in, d_out, 8).to(device)
        torch.nn.init.normal_(layer.weight, std=0.02)
        if args.linear == "merged":
            groups = RouteGroups.from_keys(torch.arange(3, device=device).repeat_interleave(-(-tokens // 3))[:tokens])
            logits = torch.randn(3, 8, device=device, requires_grad=True)

            def make_dispatch():
                decision = select_top_k(logits, 2, 0.0, training=False)
                return MergedDispatch(decision.dense_weights(8), groups, decision, rows_sorted=True)
        else:
            dispatch = build_token_dispatch(select_top_k(torch.randn(tokens, 8, device=device), 2, 0.0, False), 8, None)
            make_dispatch = lambda: dispatch  # noqa: E731

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x) if make_dispatch is None else layer(x, make_dispatch())
        out.float().sum().backward()

    return step


@dataclass
class ProfileStepArguments:
    size: str = field(default="b", metadata={"help": "model size preset"})
    routing: str = field(default="attribute", metadata={"help": "moe_routing"})
    linear: Optional[str] = field(default=None, metadata={
        "choices": ["dense", "merged", "token"], "help": "profile one MoE linear of this kind instead of a step"})
    batch: int = field(default=64, metadata={"help": "images per step"})
    top_k: int = field(default=2, metadata={"help": "experts per token (or per route key)"})
    inputs: str = field(default="mixed", metadata={"choices": ["mixed", "classification"], "help": "see bench_moe.make_inputs"})
    host_route_keys: bool = field(default=False, metadata={"help": "route inputs stay on the CPU (see make_inputs)"})
    image_size: int = field(default=224, metadata={"help": "input resolution"})
    rows: int = field(default=25, metadata={"help": "rows of each printed table"})
    trace: Optional[str] = field(default=None, metadata={"help": "also write a Chrome trace here"})
    infer: bool = field(default=False, metadata={"help": "profile an inference forward (eval, no grad) instead"})
    bf16_weights: bool = field(default=False, metadata={"help": "with --infer: the model cast to bf16 (no weight casts)"})
    compile: bool = field(default=False, metadata={"help": "compile the encoder (static shapes)"})
    compile_mode: Optional[str] = field(default=None, metadata={"help": "torch.compile mode, e.g. reduce-overhead"})
    compile_layers_per_graph: int = field(default=0, metadata={
        "help": "consecutive layers in one compiled call (1: each layer; 0: the whole encoder)"})
    sort: str = field(default="device", metadata={
        "help": "comma list of tables: ops by their own GPU time (device), by their own host time (cpu)"})
    python: bool = field(default=False, metadata={
        "help": "also list Python functions by inclusive host time (where host time is spent)"})
    shapes: bool = field(default=False, metadata={"help": "split ops by input shapes"})


def main(argv=None):
    args = parse_script_arguments(ProfileStepArguments, argv, prog="python -m benchmarks.profile_step", description=__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = linear_step(args, device, dtype) if args.linear else model_step(args, device, dtype)
    for _ in range(3):
        step()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    synchronize()
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes, with_stack=args.python) as prof:
        for _ in range(2):
            step()
        synchronize()
    events = prof.key_averages()
    # kernels only: op rows repeat their kernels' time, and GPU-side annotations ("## Call CompiledFxGraph",
    # the compiled graphs' ranges) span kernels already counted (earlier logs counted them twice)
    device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False) and not e.key.startswith("## "))
    print(f"per step: wall {wall_ms:.1f} ms (unprofiled, mean of 5); GPU kernel time {device_us / 2e3:.1f} ms; "
          f"host CPU time {events.self_cpu_time_total / 2e3:.1f} ms (profiled)")
    if args.compile:
        counters = torch._dynamo.utils.counters
        print(f"compiled: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph breaks "
              f"{dict(counters['graph_break'])}")
    table_events = prof.key_averages(group_by_input_shape=True) if args.shapes else events
    for order in args.sort.split(","):
        key = "self_cuda_time_total" if device.type == "cuda" and order == "device" else "self_cpu_time_total"
        print(f"ops by {key} (2 steps):")
        print(table_events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60,
                                 max_shapes_column_width=70))
    if args.python:
        functions = sorted((e for e in events if ".py(" in e.key), key=lambda e: -e.cpu_time_total)
        print("Python functions by inclusive host time per step (ms), calls per step:")
        for e in functions[: args.rows]:
            print(f"{e.cpu_time_total / 2e3:9.2f} {e.count / 2:7.0f}  {e.key[-110:]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
