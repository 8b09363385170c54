"""Multi-task pre-training entry point.

    accelerate launch -m training.pretrain --config training/configs/<name>.yaml [--set train.max_steps=100 ...]
    python -m training.pretrain            # the main job: tiny attribute-MoE model on the small real data, CPU

With no arguments it uses `training/configs/tiny_cpu.yaml`: builds the small data slice from the Debian
packages if missing, pre-trains for a few minutes, evaluates every task and writes `final/` (model +
processor), `report.md`/`report.json`, `loss_curves.png`, `metrics.jsonl`, TensorBoard logs and
resumable checkpoints under `outputs/pretrain-tiny`. Running it again resumes from the last checkpoint
(`--set train.resume=none` starts over, moving the earlier run to `<output_dir>/previous-run-<n>/`).
"""

from __future__ import annotations

import logging
import os
import sys

from modeling_uniperceiver_moe.command_line import parse_script_arguments

from .config import RunArguments


def main(argv=None) -> dict:
    args = parse_script_arguments(RunArguments, argv, prog="python -m training.pretrain", description=__doc__)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from .build_data import CorruptData
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .data import EmptyDatasetError
    from .tasks import MalformedSample
    from .trainer import LaunchMismatch, NonFiniteTraining, TrainingInterrupted

    try:
        config = args.load()
        from .trainer import Pretrainer

        trainer = Pretrainer(config)
        results = trainer.train()
    except (ConfigError, CorruptData, EmptyDatasetError, MalformedSample, FileNotFoundError, CheckpointError,
            LaunchMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteTraining as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    except TrainingInterrupted as error:
        print(f"\n{error}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:  # before training started or while evaluating / writing final/
        print("\ninterrupted (outside the training steps); checkpoints already written are kept", file=sys.stderr)
        raise SystemExit(130) from None
    if trainer.accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "report.md")) as handle:
            print(handle.read())
    return results


if __name__ == "__main__":
    main()
