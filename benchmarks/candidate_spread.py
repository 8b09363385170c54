"""How far apart the candidate words' features are: a new model against a trained one.

    python -m benchmarks.candidate_spread [--config training/configs/mlm_tiny.yaml] [--model DIR ...]

MLM and captioning score each masked or next word against every word of the candidate vocabulary, encoded
by the shared encoder as `[SPE] w [EOS]` (`TaskContext.word_targets`). Prints, for a freshly initialised
model of the config and for each trained model given (`final/` of a run), the mean and spread of the
pairwise cosine between the candidate features (the target head's output), and the MLM logit scale. A mean
near 1 means the candidates sit in a narrow cone, so even a confident query separates them only by a small
fraction of the logit scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modeling_uniperceiver_moe.command_line import parse_script_arguments


def candidate_cosines(model, inputs: dict) -> tuple[float, float]:
    """Mean and standard deviation of the off-diagonal cosines between the candidate features `[K, d]`."""
    with torch.no_grad():
        features, _ = model.encode_targets(inputs["target_input_ids"], None, inputs["target_attention_mask"],
                                           inputs.get("target_attribute_vectors"), inputs.get("target_task_ids"))
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    cosine = unit @ unit.t()
    off_diagonal = cosine[~torch.eye(len(cosine), dtype=torch.bool)]
    return float(off_diagonal.mean()), float(off_diagonal.std())


@dataclass
class CandidateSpreadArguments:
    config: str = field(default="training/configs/mlm_tiny.yaml", metadata={"help": "the run config of the models"})
    model: list[str] = field(default_factory=list, metadata={
        "action": "extend", "help": "trained model directories (a run's final/)"})
    set: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "SECTION.FIELD=VALUE", "help": "config overrides, as training.pretrain's"})


def main(argv=None) -> list[dict]:
    args = parse_script_arguments(CandidateSpreadArguments, argv, prog="python -m benchmarks.candidate_spread", description=__doc__)

    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from training.config import load_config
    from training.tasks import build_batch
    from training.trainer import Pretrainer

    config = load_config(args.config, ["train.tracker=null", "train.compile=false", "output_dir=outputs/candidate-spread",
                                       *args.set])
    trainer = Pretrainer(config)
    name = next((n for n, t in trainer.tasks.items() if t.family == "mlm"), None)
    if name is None:
        raise SystemExit(f"error: {args.config} has no MLM task")
    # one MLM batch of held-out rows carries the candidates and their route inputs
    inputs = build_batch(trainer.tasks[name], trainer.eval_rows()[name][:4], trainer.ctx, epoch=0).inputs
    models = [("new model (" + config.model.get("initializer_scheme", "fan_in") + " init)", trainer.model)]
    models += [(path, UniPerceiverMoEForGenericPerception.from_pretrained(path)) for path in args.model]
    rows = []
    print(f"{len(inputs['target_input_ids'])} candidate words; task {name}")
    print("| model | mean pairwise cosine | std | MLM logit scale |")
    print("|---|---|---|---|")
    for label, model in models:
        model.eval()
        mean, std = candidate_cosines(model, inputs)
        scale = model.logit_scales("mlm").item()
        rows.append({"model": label, "mean_cosine": mean, "std_cosine": std, "logit_scale": scale})
        print(f"| {label} | {mean:.3f} | {std:.3f} | {scale:.2f} |")
    return rows


if __name__ == "__main__":
    main()
