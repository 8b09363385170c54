"""Profile one training step of a routing with torch.profiler and print the top CUDA/CPU ops.

    python -m benchmarks.profile_step --size b --routing attribute --batch 64
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moe import make_config, make_inputs
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="b")
    parser.add_argument("--routing", default="attribute")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = make_config(args.size, args.routing, 8, 2, args.image_size)
    model = UniPerceiverMoEForGenericPerception(config).to(device).train()
    inputs, _ = make_inputs(config, args.batch, 20, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
