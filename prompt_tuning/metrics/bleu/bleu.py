"""Corpus BLEU-4 (sacrebleu, 13a tokenisation) as an `evaluate` metric module that loads offline."""

import datasets
import evaluate


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU-4 computed by sacrebleu (scores 0-100).",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: str; references: list of str (one or more per prediction).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        width = max(len(r) for r in references)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        result = sacrebleu.corpus_bleu(predictions, streams)
        return {"bleu": result.score, "precisions": result.precisions, "brevity_penalty": result.bp}
