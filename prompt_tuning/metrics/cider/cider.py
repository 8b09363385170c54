"""CIDEr-D (Vedantam et al., CVPR 2015; the coco-caption variant) as an `evaluate` metric module.

Per n in 1..4: TF-IDF vectors of the n-grams, the IDF taken over the reference sets of the evaluated
corpus; a hypothesis n-gram weight is clipped at the reference's; cosine similarity times a Gaussian
penalty on the length difference (sigma 6); averaged over n and references, times 10. Texts are
lower-cased and split into alphanumeric words (coco-caption uses the PTB tokenizer, which needs Java).
As in coco-caption, the lengths compared are the bigram counts.
"""

import math
import re
from collections import Counter

import datasets
import evaluate

SIGMA = 6.0
MAX_N = 4


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngram_counts(text: str) -> Counter:
    tokens = words(text)
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_N + 1) for i in range(len(tokens) - n + 1))


def tfidf(counts: Counter, document_frequency: Counter, log_corpus: float):
    vectors = [dict() for _ in range(MAX_N)]
    norms = [0.0] * MAX_N
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = tf * (log_corpus - math.log(max(1.0, document_frequency[gram])))
        vectors[n][gram] = weight
        norms[n] += weight * weight
        if n == 1:
            length += tf
    return vectors, [math.sqrt(x) for x in norms], length


def similarity(hyp, ref) -> list[float]:
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * SIGMA**2))
    out = []
    for n in range(MAX_N):
        value = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
        if norm_h[n] != 0 and norm_r[n] != 0:
            value /= norm_h[n] * norm_r[n]
        out.append(value * penalty)
    return out


def cider_d(predictions, references) -> tuple[float, list[float]]:
    ref_counts = [[ngram_counts(r) for r in refs] for refs in references]
    document_frequency = Counter()
    for refs in ref_counts:
        document_frequency.update({g for counts in refs for g in counts})
    log_corpus = math.log(float(len(references)))
    scores = []
    for prediction, refs in zip(predictions, ref_counts):
        hyp = tfidf(ngram_counts(prediction), document_frequency, log_corpus)
        total = [0.0] * MAX_N
        for counts in refs:
            for n, value in enumerate(similarity(hyp, tfidf(counts, document_frequency, log_corpus))):
                total[n] += value
        scores.append(10.0 * (sum(total) / MAX_N) / len(refs))
    return sum(scores) / len(scores), scores


class Cider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="CIDEr-D consensus score of captions against reference captions.",
            citation="Vedantam, Zitnick, Parikh. CIDEr: Consensus-based Image Description Evaluation. CVPR 2015.",
            inputs_description="predictions: str; references: list of str per prediction.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("CIDEr of an empty corpus")
        score, per_caption = cider_d(predictions, references)
        return {"cider": score, "per_caption": per_caption}
