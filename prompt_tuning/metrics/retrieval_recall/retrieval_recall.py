"""Image-text retrieval recall@K in both directions, as an `evaluate` metric module (offline).

predictions: one row of image->text similarity scores per image query (N images x M texts);
references: the index of each image's true text. Text->image recall treats every text whose true image
is i as a query over the N images (transpose of the score matrix). A candidate tied with the true one
counts as ranked above it, so degenerate (constant) scores give chance-level recall.
"""

import datasets
import evaluate
import numpy as np
import torch

from training.evaluation import recall_at_k  # the one ranking rule, shared with pre-training's evaluation


def recall_at(scores: np.ndarray, truth: np.ndarray, ks) -> dict:
    return recall_at_k(torch.from_numpy(scores), torch.from_numpy(truth).long(), ks)


class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Recall@1/5/10 of image->text and text->image retrieval.",
            citation="",
            inputs_description="predictions: list of float scores per image (over all texts); references: int index of the true text.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        scores = np.asarray(predictions, dtype=np.float64)
        truth = np.asarray(references)
        out = {f"i2t_R@{k}": v for k, v in recall_at(scores, truth, ks).items()}
        text_queries = scores.T  # [M texts, N images]
        owner = np.full(scores.shape[1], -1)
        owner[truth] = np.arange(len(truth))
        keep = owner >= 0
        out.update({f"t2i_R@{k}": v for k, v in recall_at(text_queries[keep], owner[keep], ks).items()})
        return out
