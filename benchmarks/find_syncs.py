"""Where a training step makes the host wait for the GPU: one B-size step (bf16, fused AdamW) under
`torch.cuda.set_sync_debug_mode("warn")`, each synchronising call counted by its call site in our code.

    python -m benchmarks.find_syncs --routing attribute [--compile]        # GPU only

Also prints the host time to enqueue a step against its wall time (equal: the host is the bottleneck).
"""

import collections
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from benchmarks.bench_moe import compile_encoder, make_config, make_inputs
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from modeling_uniperceiver_moe.command_line import parse_script_arguments


@dataclass
class FindSyncsArguments:
    size: str = field(default="b", metadata={"help": "model size preset"})
    routing: str = field(default="attribute", metadata={"help": "moe_routing"})
    batch: int = field(default=64, metadata={"help": "images per step"})
    compile: bool = field(default=False, metadata={"help": "compile the encoder first"})


def main(argv=None):
    args = parse_script_arguments(FindSyncsArguments, argv, prog="python -m benchmarks.find_syncs", description=__doc__)
    if not torch.cuda.is_available():
        raise SystemExit("find_syncs needs a CUDA device (host/device synchronisation does not exist on the CPU)")
    device = torch.device("cuda")
    config = make_config(args.size, args.routing, 8, 2, 224)
    model = UniPerceiverMoEForGenericPerception(config).to(device).train()
    if args.compile:
        compile_encoder(model)
    inputs, _ = make_inputs(config, args.batch, 20, device, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message) or "prototype" in str(message):
            return  # only the synchronising calls, not the debug mode's own notice
        ours = [f for f in traceback.extract_stack()[:-1] if "modeling_uniperceiver_moe" in f.filename]
        sites[" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in ours[-3:]) or filename] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f"{args.routing} (compiled={args.compile}): {sum(sites.values())} synchronising calls in one step")
    for where, count in sites.most_common():
        print(f"  {count:4d}  {where}")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        step()
    enqueued = (time.perf_counter() - start) / 3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 3
    print(f"host time to enqueue a step {enqueued * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
