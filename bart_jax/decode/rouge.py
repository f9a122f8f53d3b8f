"""ROUGE-1/2/L/Lsum with Google's rouge-score package (Porter stemming), as summarization papers report it.

rougeLsum is summary-level LCS over *sentences*, and rouge-score finds sentences only at newlines: text
without them silently scores rougeLsum == rougeL (the mistake behind transformers issue #6808). So both
predictions and references are split into sentences (the project's regex splitter, no nltk) and joined by
newlines before scoring; the other three metrics treat newlines as plain whitespace.
"""

from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def sentences_per_line(text: str) -> str:
    """`text` with one sentence per line (split after . ! ? and at line breaks), the layout rougeLsum needs."""
    from bart_jax.data.text import split_sentences

    return "\n".join(split_sentences(text))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 (in percent) of ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum over prediction/reference pairs."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentences_per_line(reference), sentences_per_line(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
