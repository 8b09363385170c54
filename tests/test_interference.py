"""The gradient-direction interference metric (`training.interference`) and its command."""

from __future__ import annotations

import json
import os

import pytest
import torch

from training.evaluation import expert_entropy, expert_overlap, expert_shares
from training.interference import default_layers, interference_matrix, main


def noisy(direction: torch.Tensor, samples: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`samples` gradients of lengths 1..2 along `direction`, each with a little noise."""
    lengths = 1.0 + torch.rand(samples, 1, generator=generator)
    return lengths * direction + scale * torch.randn(samples, direction.numel(), generator=generator)


def test_parallel_opposite_and_orthogonal_tasks_give_one_below_zero_and_zero():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.zeros(64), torch.zeros(64)
    a[0], b[1] = 1.0, 1.0
    tasks = [noisy(a, 20, 0.05, generator),        # 0
             noisy(3.0 * a, 20, 0.05, generator),  # 1: parallel, three times as large
             noisy(-a, 20, 0.05, generator),       # 2: opposite
             noisy(b, 20, 0.05, generator)]        # 3: orthogonal
    matrix = interference_matrix(tasks)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    assert matrix[0, 1] == pytest.approx(1.0, abs=0.05) and matrix[1, 0] == pytest.approx(1.0, abs=0.05)
    assert matrix[0, 2] < -0.9 and matrix[2, 0] < -0.9
    assert abs(matrix[0, 3]) < 0.1 and abs(matrix[3, 0]) < 0.1


def test_the_metric_by_hand_on_two_samples_each():
    """I[i, j] = mean_x_i (mean_x_j g_i . g_j / |g_j|) / (mean over the other x_i' of g_i . g_i' / |g_i'|)."""
    g0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    g1 = torch.tensor([[0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    matrix = interference_matrix([g0, g1])
    unit1 = g1 / g1.norm(dim=1, keepdim=True)  # [0, 1], [0.6, 0.8]
    own0 = torch.stack([g0[0] @ g0[1] / g0[1].norm(), g0[1] @ g0[0] / g0[0].norm()])  # the other sample only
    cross01 = (g0 @ unit1.t()).mean(1)
    assert matrix[0, 1] == pytest.approx(float((cross01 / own0).mean()), rel=1e-12)
    unit0 = g0 / g0.norm(dim=1, keepdim=True)
    own1 = torch.stack([g1[0] @ g1[1] / g1[1].norm(), g1[1] @ g1[0] / g1[0].norm()])
    assert matrix[1, 0] == pytest.approx(float(((g1 @ unit0.t()).mean(1) / own1).mean()), rel=1e-12)
    steady = interference_matrix([g0, g1], reduce="ratio_of_means")
    assert steady[0, 1] == pytest.approx(float(cross01.mean() / own0.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="samples >= 2"):
        interference_matrix([g0, g1[:1]])


def test_expert_shares_weigh_the_real_tokens_choices_and_compare_tasks():
    """Shares per gate of the real tokens' gate weight; the overlap is 1 for the same shares and 0 for
    disjoint experts; the entropy is 1 for every expert alike and 0 for one expert."""
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    first = torch.tensor([[[0, 1], [0, 2], [3, 3]]])  # gate 0: experts 0, 1, then 0, 2 (padding's 3s not counted)
    first_weights = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]]])
    second = torch.tensor([[[3, 2], [3, 2], [0, 0]]])  # gate 1: expert 3 with all the weight
    second_weights = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]])
    shares = expert_shares((first, second), (first_weights, second_weights), mask, num_experts=4)
    assert shares.tolist() == [[0.625, 0.125, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]]
    uniform, single = torch.full((1, 4), 0.25, dtype=torch.float64), torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert expert_entropy(uniform) == pytest.approx(1.0) and expert_entropy(single) == pytest.approx(0.0)
    other = torch.tensor([[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    overlap = expert_overlap([shares, other])
    assert overlap[0, 0] == pytest.approx(1.0) and overlap[1, 1] == pytest.approx(1.0)
    assert overlap[0, 1] == pytest.approx((0.25 + 0.0) / 2) and overlap[1, 0] == overlap[0, 1]


def test_default_layers_are_the_thirds_of_the_depth():
    assert default_layers(12) == [3, 7, 11] and default_layers(24) == [7, 15, 23] and default_layers(2) == [0, 1]


def test_the_command_runs_on_a_tiny_model_and_names_bad_input(tiny_cache, tmp_path, capsys):
    from conftest import tiny_config
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    model_dir = str(tmp_path / "model")
    UniPerceiverMoEForGenericPerception(tiny_config("attribute", moe_layers="every_other")).save_pretrained(model_dir)
    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--data_cache", tiny_cache, "--slice", "tiny", "--vocabulary_size", "64"]
    result = main(common + ["--tasks", "fashion_mnist_classification,austen_mlm,emoji_retrieval", "--samples", "4",
                            "--out", out])
    written = json.load(open(os.path.join(out, "interference.json")))
    assert written["tasks"] == result["tasks"] and written["layers"] == [0, 1]
    assert written["weights"] == ["layers.0.mlp.fc2.weight", "layers.1.mlp.fc2.weight"]
    assert written["expert_stacks"] == ["layers.1.mlp.fc2.weight"]  # every other layer: the second is MoE
    for key in ("matrix", "matrix_ratio_of_means"):
        matrix = torch.tensor(written[key])
        assert matrix.shape == (3, 3) and torch.allclose(matrix.diagonal(), torch.ones(3)), key
        assert torch.isfinite(matrix).all(), key
    assert os.path.getsize(os.path.join(out, "interference.png")) > 0
    assert written["expert_gates"] == ["1.attn", "1.ffn"]  # the MoE layer's two gates
    for name in written["tasks"]:  # 4 experts per gate, shares summing to 1
        usage = torch.tensor(written["expert_usage"][name])
        assert usage.shape == (2, 4) and torch.allclose(usage.sum(1), torch.ones(2), atol=1e-3)
        assert 0.0 <= written["expert_entropy"][name] <= 1.0
    overlap = torch.tensor(written["expert_overlap"])
    assert overlap.shape == (3, 3) and torch.allclose(overlap.diagonal(), torch.ones(3), atol=1e-3)
    for argv, message in ((["--tasks", "austen_mlm", "--out", out], "at least two different tasks"),
                          (["--tasks", "austen_mlm,imagenet", "--out", out], "unknown task 'imagenet'"),
                          (["--tasks", "austen_mlm,kjv_mlm", "--layers", "5", "--out", out], "--layers")):
        with pytest.raises(SystemExit, match=message):
            main(common + argv)
