"""AdamW step time: torch's fused implementation against its multi-tensor (foreach) one, side by side.

    python -m benchmarks.bench_optimizer [--config training/configs/tiny_cpu.yaml] [--device cpu] [--steps 20]

Builds the config's model with the trainer's parameter groups, gives every parameter a random gradient and
times `optimizer.step()` for each implementation, alternating them over `--repeats` rounds so that both see
the same machine load. Prints the median milliseconds per step and the ratio. The main job's CPU model is
dominated by its word-embedding table (6.3M of 8.4M parameters), which every step updates in full, so the
optimizer's passes over memory are a visible part of a CPU training step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from modeling_uniperceiver_moe.command_line import parse_script_arguments


def time_steps(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Milliseconds per `optimizer.step()`, averaged over `steps` (after one untimed step)."""
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1000.0


@dataclass
class BenchOptimizerArguments:
    config: str = field(default="training/configs/tiny_cpu.yaml", metadata={"help": "the run config of the model"})
    device: str = field(default="cpu", metadata={"help": "where the model and optimizer live"})
    steps: int = field(default=20, metadata={"help": "timed optimizer steps per measurement"})
    repeats: int = field(default=3, metadata={"help": "measurements per optimizer, interleaved"})


def main(argv=None) -> dict:
    args = parse_script_arguments(BenchOptimizerArguments, argv, prog="python -m benchmarks.bench_optimizer", description=__doc__)

    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from training.config import load_config
    from training.trainer import build_model_config, make_optimizer

    config = load_config(args.config, ["train.tracker=null"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(build_model_config(config)).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizers = {}
    for name, fused in (("foreach", False), ("fused", True)):
        config.optim.fused = fused
        optimizers[name] = make_optimizer(model, config.optim, device)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            times[name].append(time_steps(optimizer, args.steps, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.config} on {device.type}: {count / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| AdamW | ms per step (median of rounds) |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    ratio = medians["foreach"] / medians["fused"]
    print(f"fused is {ratio:.2f}x faster")
    return {"ms_per_step": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
