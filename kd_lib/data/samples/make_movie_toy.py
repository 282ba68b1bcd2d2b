"""Write ``movie_toy.csv``: 900 short made-up movie reviews labelled positive / negative / mixed.

Run once (``python -m kd_lib.data.samples.make_movie_toy``); the CSV is committed beside this
script and read by ``data.source: movie_toy``. Standard library only, seeded: the same file
every time. Each review joins 2-4 clauses drawn from word lists (subject, verb, sentiment
phrase, filler); a positive review holds only praise, a negative one only complaints, a mixed
one both, and some clauses negate their phrase ("was not dull"), so bag-of-words alone is
not quite enough.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = [
    "the film",
    "this movie",
    "the plot",
    "the acting",
    "the soundtrack",
    "the director",
    "the script",
    "the cast",
    "the ending",
    "the cinematography",
    "the dialogue",
    "the lead actress",
    "the villain",
    "the pacing",
    "the sequel",
    "the special effects",
]
PRAISE = [
    "brilliant",
    "moving",
    "gripping",
    "delightful",
    "superb",
    "charming",
    "clever",
    "beautiful",
    "hilarious",
    "stunning",
    "heartfelt",
    "memorable",
    "inventive",
    "powerful",
    "wonderful",
]
COMPLAINT = [
    "dull",
    "boring",
    "clumsy",
    "tedious",
    "awful",
    "predictable",
    "forgettable",
    "messy",
    "bland",
    "painful",
    "lifeless",
    "confusing",
    "shallow",
    "sloppy",
    "terrible",
]
VERBS = ["was", "felt", "seemed", "is", "looked", "sounded", "came across as", "turned out"]
FILLERS = [
    "",
    "",
    "",
    "honestly",
    "to be fair",
    "overall",
    "at times",
    "from start to finish",
    "for me",
    "in the second half",
    "surprisingly",
    "as expected",
]
LABELS = ("positive", "negative", "mixed")


def clause(rng: random.Random, good: bool) -> str:
    """One clause that praises (``good``) or complains; one time in ten by negating the other side."""
    negate = rng.random() < 0.1
    words = (COMPLAINT if good else PRAISE) if negate else (PRAISE if good else COMPLAINT)
    verb = rng.choice(VERBS)
    parts = [rng.choice(SUBJECTS), f"{verb} not" if negate else verb, rng.choice(words), rng.choice(FILLERS)]
    return " ".join(p for p in parts if p)


def review(rng: random.Random, label: str) -> str:
    """A review of 2-4 clauses with the sentiment of ``label``."""
    n = rng.randint(2, 4)
    if label == "mixed":
        kinds = [True, False] + [rng.random() < 0.5 for _ in range(n - 2)]
        rng.shuffle(kinds)
    else:
        kinds = [label == "positive"] * n
    text = ", and ".join(clause(rng, good) for good in kinds)
    return text[0].upper() + text[1:] + rng.choice([".", "!", ".", "..."])


OUTPUT = Path(__file__).with_name("movie_toy.csv")


def main(path: Path = OUTPUT, rows: int = 900, seed: int = 17) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = LABELS[i % len(LABELS)]
            writer.writerow([review(rng, label), label])


if __name__ == "__main__":
    main()
