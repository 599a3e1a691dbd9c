"""`chunbot sim gen`: synthetic review cases whose right answers the simulator knows.

Each case is a review with a gold `label` (positive, negative or neutral). A share `hard` of
them are written so that the simulated model, which labels by counting lexicon words, gets
them wrong: sarcasm ("Oh great, it broke on day one. Just perfect.") reads positive to it,
a hedged complaint reads neutral. So a `chunbot test` of a pipeline that labels them with
`sim` passes 1 − hard of the cases, which makes the test bench itself testable.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from .model import sentiment

PRODUCTS = ("kettle", "blender", "headphones", "desk lamp", "backpack", "phone case",
            "coffee grinder", "office chair", "water bottle", "toaster", "keyboard", "tent")
ASPECTS = ("battery", "sound", "lid", "handle", "strap", "screen", "charger", "packaging")
PLAIN = {
    "positive": ("Great {p}, I love it. The {a} is excellent.",
                 "Wonderful {p}: sturdy, fast and worth every cent. The {a} is perfect.",
                 "Really happy with this {p}. Excellent {a}, would recommend."),
    "negative": ("Terrible {p}. The {a} broke after a week, what a waste.",
                 "Awful {p}: the {a} is defective and the refund never came.",
                 "Disappointed with this {p}. The {a} stopped working, useless."),
    "neutral": ("The {p} is okay. The {a} is average, nothing more.",
                "An acceptable {p}; the {a} is fine, decent for the price.",
                "It is an alright {p}. Mixed feelings about the {a}, mediocre but okay."),
}
# Reviews whose label a lexicon count gets wrong: the simulator's blind spots.
HARD = {
    "negative": ("Oh great, the {p} broke on day one. Just perfect. Love wasting money.",
                 "Wow, amazing {p}: the {a} fell off in an hour. Fantastic quality, really."),
    "positive": ("I expected it to be terrible and flimsy, but this {p} is not bad at all; "
                 "the {a} never broke and it is not disappointing.",),
}


def cases(records: int, hard: float = 0.0, seed: int = 0,
          words: int = 0) -> Iterator[dict[str, Any]]:
    """`records` cases; `words` > 0 pads each text with neutral filler words to about that
    many words (for big test sets), without changing how the simulator labels it."""
    rng = random.Random(seed)
    hard_count = round(records * hard)
    chosen = set(rng.sample(range(records), hard_count)) if hard_count else set()
    for i in range(records):
        product, aspect = rng.choice(PRODUCTS), rng.choice(ASPECTS)
        if i in chosen:
            label = rng.choice(tuple(HARD))
            text = rng.choice(HARD[label]).format(p=product, a=aspect)
        else:
            label = rng.choice(tuple(PLAIN))
            text = rng.choice(PLAIN[label]).format(p=product, a=aspect)
        if words:
            filler = " ".join(rng.choice(_FILLER) for _ in range(max(0, words - len(text.split()))))
            text = f"{text} {filler}".strip()
        case = {"id": f"c{i:07d}", "product": product, "text": text, "label": label}
        assert (sentiment(text) == label) == (i not in chosen), text  # what makes it known
        yield case


_FILLER = ("it", "arrived", "on", "a", "tuesday", "in", "the", "box", "with", "paper", "and",
           "a", "manual", "for", "the", "kitchen", "at", "home", "this", "week")
