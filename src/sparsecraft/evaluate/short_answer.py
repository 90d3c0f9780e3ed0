"""Scoring short generated answers against a list of accepted answers (the `sc_indep_qa` task).

Chat models rarely answer with the bare answer ("Nairobi"); they write a sentence ("The capital of Kenya is
Nairobi."). Two metrics, both over normalised text (lower case, thousands separators dropped, punctuation turned
into spaces, the articles a/an/the removed, whitespace collapsed):

- `match` (the headline): an accepted answer occurs as whole words in the answer's first line;
- `exact_match`: the first line *is* an accepted answer.

Only the first line counts, so a model cannot score by listing many candidates over several lines.
"""

from __future__ import annotations

import re

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """`"The Nile, 6,650 km."` -> `"nile 6650 km"`."""
    text = _THOUSANDS.sub("", text.lower())
    text = _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text))
    return " ".join(text.split())


def first_line(response: str) -> str:
    """The first non-empty line of a response ('' when there is none)."""
    return next((line for line in response.strip().splitlines() if line.strip()), "")


def score(response: str, answers: list[str]) -> dict[str, float]:
    """`{"match": 0|1, "exact_match": 0|1}` of one response against its accepted answers."""
    line = normalise(first_line(response))
    accepted = [a for a in (normalise(answer) for answer in answers) if a]
    padded = f" {line} "
    return {"match": float(any(f" {a} " in padded for a in accepted)),
            "exact_match": float(line in accepted)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: the (greedy) generation for one question, scored against `doc["answers"]`."""
    return score(results[0], doc["answers"])
