"""Does the layout or alignment of the grouped GEMM's operands change its speed? (GPU, bf16)

    python -m benchmarks.probe_grouped_mm

For B's three projection shapes on the 15,232 input tokens of the benchmark batch, times (CUDA events,
mean of 30 after 5 warm-up calls) a dense `F.linear` against `F.grouped_mm` with:
* the weight as the model passes it (a transposed view of `[G, out, in]`) or made contiguous `[G, in, out]`;
* the benchmark's three attribute groups (1,280 / 6,304 / 7,648 rows), 8 equal groups, or three
  groups rounded to multiples of 128 rows;
and forward + backward for the three groups. Then the cost of finding the distinct attribute vectors
of 16,448 tokens: `torch.unique(dim=0)` against a unique over integer codes of the 0/1 vectors.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modeling_uniperceiver_moe.command_line import parse_script_arguments


def cuda_time_ms(fn, steps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


@dataclass
class ProbeGroupedMmArguments:
    """No options: the shapes are bench_moe's B batch."""


def main(argv=None) -> None:
    parse_script_arguments(ProbeGroupedMmArguments, argv, prog="python -m benchmarks.probe_grouped_mm", description=__doc__)
    device, bf16 = "cuda", torch.bfloat16
    rows = 64 * 238  # the input pass of bench_moe's B batch
    three = [1280, 6304, 7648]
    layouts = (("ragged3", three), ("equal8", [rows // 8] * 7 + [rows - 7 * (rows // 8)]), ("a128_3", [1280, 6272, 7680]))
    for d_in, d_out in ((768, 3072), (3072, 768), (768, 2304)):
        x = torch.randn(rows, d_in, device=device, dtype=bf16)
        weight = torch.randn(d_out, d_in, device=device, dtype=bf16)
        dense = cuda_time_ms(lambda: F.linear(x, weight))
        print(f"[{d_in}->{d_out}] dense F.linear {dense * 1e3:7.1f} us  {2 * rows * d_in * d_out / dense / 1e9:6.0f} TFLOP/s")
        for name, sizes in layouts:
            offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
            stacked = torch.randn(len(sizes), d_out, d_in, device=device, dtype=bf16)
            view, contiguous = stacked.transpose(1, 2), stacked.transpose(1, 2).contiguous()
            a = cuda_time_ms(lambda: F.grouped_mm(x, view, offs=offsets))
            b = cuda_time_ms(lambda: F.grouped_mm(x, contiguous, offs=offsets))
            print(f"   {name:8s} fwd  B^T view {a * 1e3:7.1f} us ({dense / a:.2f} of dense)   "
                  f"B contiguous {b * 1e3:7.1f} us ({dense / b:.2f})")
        offsets = torch.tensor(three, device=device).cumsum(0).to(torch.int32)
        x_grad = x.clone().requires_grad_()
        weight_grad = weight.clone().requires_grad_()
        grad_out = torch.randn(rows, d_out, device=device, dtype=bf16)
        dense = cuda_time_ms(lambda: torch.autograd.backward(F.linear(x_grad, weight_grad), grad_out))
        stacked = torch.randn(3, d_out, d_in, device=device, dtype=bf16, requires_grad=True)
        contiguous = torch.randn(3, d_in, d_out, device=device, dtype=bf16, requires_grad=True)
        a = cuda_time_ms(lambda: torch.autograd.backward(F.grouped_mm(x_grad, stacked.transpose(1, 2), offs=offsets), grad_out))
        b = cuda_time_ms(lambda: torch.autograd.backward(F.grouped_mm(x_grad, contiguous, offs=offsets), grad_out))
        print(f"   fwd+bwd ragged3: dense {dense * 1e3:7.1f} us; B^T view {a * 1e3:7.1f} ({dense / a:.2f}); "
              f"B contiguous {b * 1e3:7.1f} ({dense / b:.2f})")

    tokens = 16448
    bits = (torch.rand(tokens, 8, device=device) < 0.3).float()
    bits[:, :3] = 0
    bits[:, 3] = (torch.arange(tokens, device=device) % 3 == 0).float()
    place = 2 ** torch.arange(8, device=device)
    rows_sorted = cuda_time_ms(lambda: torch.unique(bits, dim=0, return_inverse=True))
    codes = cuda_time_ms(lambda: torch.unique((bits.long() * place).sum(-1), return_inverse=True))
    print(f"unique_dim {rows_sorted * 1e3:.0f} us; unique over int codes {codes * 1e3:.0f} us")


if __name__ == "__main__":
    main()
