"""Offline `evaluate` metric modules: `load_metric("accuracy" | "retrieval_recall" | "bleu" | "cider")`."""

import os

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
METRICS = ("accuracy", "retrieval_recall", "bleu", "cider")


def load_metric(name: str):
    """`evaluate.load` of one of our metric folders (no Hub access)."""
    import evaluate

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {METRICS}")
    return evaluate.load(os.path.join(METRICS_DIR, name))
