"""Sharing Uni-Perceiver-MoE checkpoints on the Hugging Face Hub.

* `hub_cards.cards`: model cards (README.md) for a pre-trained model, a prompt-tuning adapter and a folded
  (merged dense) export, built from the checkpoint folder and its measured results;
* `hub_cards.push`: `python -m hub_cards.push <folder> --repo-id user/name ...` writes the card into a
  staging copy and uploads it (or only writes it, with `--dry-run`);
* `hub_cards.convert_reference`: the reference implementation's checkpoints -> our layout.

The in-memory Hub server the tests push to is `tests/fake_hub.py` (not part of the installed package).
"""
