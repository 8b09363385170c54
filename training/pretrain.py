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

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny_cpu.yaml")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from .build_data import CorruptData
    from .checkpoints import CheckpointError
    from .config import ConfigError, load_config
    from .data import EmptyDatasetError
    from .tasks import MalformedSample
    from .trainer import LaunchMismatch, NonFiniteTraining, TrainingInterrupted

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = load_config(args.config, overrides)
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
