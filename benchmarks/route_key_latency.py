"""Host latency of reading a batch's route-key table: integer codes (`distinct_route_keys`) against
`torch.unique(dim=0)`, with the GPU idle and with ~4 ms of GPU work queued (the call then waits for it).

    python -m benchmarks.route_key_latency              # GPU
    python -m benchmarks.route_key_latency --broadcast  # CPU or GPU

Median of 25 calls of `route_key_table(attribute_vectors, return_groups=True)` on bench_moe's B batch
(16,448 tokens, 8 attributes).

`--broadcast`: a training step's read of its inputs' and candidates' tables (`route_key_tables`, what
`merge_for_step` reads on the host) for `gpu_b.yaml`'s MLM, captioning and classification batches, with the
route inputs as the task registry gives them (broadcast views: one attribute row for every candidate,
the same per-token rows for every sequence) against materialised copies of them, interleaved over
`--rounds` rounds; median microseconds and their ratio per batch kind.
"""

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from benchmarks.bench_moe import make_config, make_inputs, sorted_route_keys
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from modeling_uniperceiver_moe.command_line import parse_script_arguments


@dataclass
class RouteKeyLatencyArguments:
    """The default shapes are bench_moe's B batch; `--broadcast` times the task registry's batches."""

    broadcast: bool = field(default=False, metadata={"help": "broadcast route inputs against materialised ones"})
    rounds: int = field(default=200, metadata={"help": "--broadcast: interleaved rounds of each batch kind"})


def step_route_inputs() -> dict[str, list[torch.Tensor]]:
    """The inputs' and candidates' attribute vectors of `gpu_b.yaml`'s batches, as the task registry builds
    them: MLM (256 sentences, 4,096 candidate words), captioning (64 images of 196 patches + SPE, 20 words),
    classification (64 images, 10 class names)."""
    from training.tasks import ATTRIBUTES, attribute_rows, caption_attributes, get_task

    captioning = get_task("emoji_captioning")
    return {
        "mlm": [attribute_rows(ATTRIBUTES["text_input"], 256), attribute_rows(ATTRIBUTES["word_target"], 4096)],
        "captioning": [caption_attributes(captioning, 64, 197, 20), attribute_rows(captioning.target_attributes, 4096)],
        "classification": [attribute_rows(ATTRIBUTES["classification_input"], 64),
                           attribute_rows(ATTRIBUTES["class_name_target"], 10)],
    }


def time_broadcast_reads(rounds: int) -> None:
    model = UniPerceiverMoEForGenericPerception(make_config("tiny", "attribute", 4, 2, 32)).eval().uniperceiver
    kinds = step_route_inputs()
    variants = {"broadcast": kinds, "materialised": {k: [v.clone() for v in vs] for k, vs in kinds.items()}}
    times = {(kind, variant): [] for kind in kinds for variant in variants}
    for round_index in range(rounds):
        for kind in kinds:
            order = list(variants.items())
            for variant, inputs in order if round_index % 2 else order[::-1]:  # each goes first in half the rounds
                start = time.perf_counter()
                model.route_key_tables(inputs[kind], return_groups=True)
                times[kind, variant].append(time.perf_counter() - start)
    print(f"route-key tables of a step (inputs and candidates), median of {rounds} interleaved rounds:")
    for kind in kinds:
        broadcast, materialised = (statistics.median(times[kind, v]) * 1e6 for v in variants)
        shapes = " + ".join(str(tuple(v.shape)) for v in kinds[kind])
        print(f"  {kind:14s} {shapes:28s} broadcast {broadcast:7.0f} us, materialised {materialised:7.0f} us "
              f"({materialised / broadcast:.2f}x)")


def main(argv=None) -> None:
    args = parse_script_arguments(RouteKeyLatencyArguments, argv, prog="python -m benchmarks.route_key_latency",
                                  description=__doc__)
    if args.broadcast:
        time_broadcast_reads(args.rounds)
        return
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
