"""Top-1 accuracy as an `evaluate` metric module that loads offline from this repository."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions: int class ids; references: int class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of an empty set")
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}
