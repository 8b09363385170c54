"""Host latency of reading a batch's route-key table: integer codes (`distinct_route_keys`) against
`torch.unique(dim=0)`, with the GPU idle and with ~4 ms of GPU work queued (the call then waits for it).

    python -m benchmarks.route_key_latency      # GPU

Median of 25 calls of `route_key_table(attribute_vectors, return_groups=True)` on bench_moe's B batch
(16,448 tokens, 8 attributes).
"""

import contextlib
import time
from dataclasses import dataclass

import torch

from benchmarks.bench_moe import make_config, make_inputs, sorted_route_keys
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from modeling_uniperceiver_moe.command_line import parse_script_arguments


@dataclass
class RouteKeyLatencyArguments:
    """No options: the shapes are bench_moe's B batch."""


def main(argv=None) -> None:
    parse_script_arguments(RouteKeyLatencyArguments, argv, prog="python -m benchmarks.route_key_latency", description=__doc__)
    config = make_config("b", "attribute", 8, 2, 224)
    model = UniPerceiverMoEForGenericPerception(config).cuda()
    inputs, _ = make_inputs(config, 64, 20, torch.device("cuda"), torch.bfloat16)
    vectors = inputs["attribute_vectors"]
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for name, context in (("codes", contextlib.nullcontext), ("unique", sorted_route_keys)):
        with context():
            for busy in (False, True):
                times = []
                for _ in range(30):
                    torch.cuda.synchronize()
                    if busy:
                        for _ in range(3):
                            big @ big
                    start = time.perf_counter()
                    model.uniperceiver.route_key_table(attribute_vectors=vectors, return_groups=True)
                    times.append(time.perf_counter() - start)
                times = sorted(times[5:])
                print(f"{name:6s} gpu {'busy' if busy else 'idle'}: median {times[len(times) // 2] * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
