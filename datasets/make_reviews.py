"""Generate datasets/reviews.jsonl: realistic product reviews for the demo pipeline.

Deterministic (fixed seed, stdlib only), so the shipped file can be rebuilt byte for byte:

    python datasets/make_reviews.py [--count 2400] [--out datasets/reviews.jsonl]

About 55% of the reviews are positive, 30% negative and 15% neutral or mixed, with ratings to
match; each combines sentences about aspects of its product (battery, sound, delivery, …).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = {
    "wireless earbuds": ["battery", "sound", "fit", "charging case", "app"],
    "espresso machine": ["taste", "temperature", "noise", "milk frother", "cleaning"],
    "running shoes": ["fit", "cushioning", "grip", "size", "laces"],
    "electric kettle": ["boil time", "lid", "handle", "noise", "limescale filter"],
    "robot vacuum": ["battery", "app", "suction", "noise", "mapping"],
    "yoga mat": ["grip", "thickness", "smell", "size", "carry strap"],
    "smart watch": ["battery", "screen", "strap", "heart rate sensor", "app"],
    "office chair": ["comfort", "armrests", "build quality", "assembly", "wheels"],
    "backpack": ["zippers", "straps", "size", "pockets", "fabric"],
    "bluetooth speaker": ["sound", "battery", "bass", "pairing", "size"],
    "air fryer": ["cooking time", "basket", "cleaning", "noise", "size"],
    "mechanical keyboard": ["switches", "keycaps", "backlight", "cable", "software"],
    "water bottle": ["lid", "insulation", "seal", "size", "paint"],
    "desk lamp": ["brightness", "colour temperature", "arm", "switch", "base"],
    "phone case": ["fit", "grip", "buttons", "drop protection", "colour"],
    "blender": ["motor", "jug", "noise", "blades", "cleaning"],
    "winter jacket": ["warmth", "zipper", "hood", "size", "pockets"],
    "hair dryer": ["drying time", "noise", "heat settings", "cord", "weight"],
    "board game": ["rules", "components", "replay value", "box", "instructions"],
    "camping tent": ["setup", "rain protection", "poles", "size", "zippers"],
    "electric toothbrush": ["battery", "brush heads", "timer", "charger", "travel case"],
    "cast iron pan": ["seasoning", "handle", "weight", "heat retention", "size"],
    "e-reader": ["screen", "battery", "page turns", "light", "store"],
    "dog bed": ["size", "cushion", "cover", "washing", "smell"],
    "coffee grinder": ["grind consistency", "noise", "hopper", "cleaning", "settings"],
    "monitor": ["colours", "stand", "dead pixels", "brightness", "cables"],
    "sleeping bag": ["warmth", "zipper", "weight", "stuff sack", "size"],
    "kids scooter": ["wheels", "brake", "handlebar", "folding", "weight"],
    "bed sheets": ["softness", "size", "colour", "washing", "stitching"],
    "power bank": ["capacity", "charging speed", "cable", "weight", "indicator lights"],
}

POSITIVE_OPENERS = [
    "I love this {product}.", "Great {product}, exactly what I needed.",
    "Excellent {product} for the price.", "Really happy with this {product}.",
    "This {product} is amazing.", "Best {product} I have owned so far.",
    "Perfect {product} for everyday use.", "Fantastic {product}, would buy again.",
]
POSITIVE_ASPECTS = [
    "The {aspect} is excellent.", "The {aspect} works well, no complaints at all.",
    "I was impressed by the {aspect}.", "The {aspect} is better than I expected.",
    "The {aspect} feels solid and reliable.", "Love the {aspect}, it is perfect.",
    "The {aspect} is great even after a few weeks of daily use.",
]
POSITIVE_CLOSERS = [
    "Highly recommend it.", "I would recommend it to anyone.", "Worth every penny.",
    "My partner wants one too.", "Five stars from me.", "Very happy with the purchase.",
]
NEGATIVE_OPENERS = [
    "Terrible {product}.", "Really disappointed with this {product}.",
    "Worst {product} I have ever bought.", "This {product} was a waste of money.",
    "Poor quality {product}, avoid it.", "I regret buying this {product}.",
]
NEGATIVE_ASPECTS = [
    "The {aspect} stopped working after two weeks.", "The {aspect} broke on the first day.",
    "The {aspect} is awful and feels cheap.", "The {aspect} is defective.",
    "The {aspect} is flimsy and poorly made.", "The {aspect} is useless in practice.",
    "The {aspect} died within a month.",
]
NEGATIVE_CLOSERS = [
    "I returned it and asked for a refund.", "Still waiting for my refund.",
    "Do not waste your money.", "Returning it tomorrow.", "Never buying this brand again.",
]
NEUTRAL_OPENERS = [
    "The {product} is okay.", "An average {product}, nothing special.",
    "Decent {product} for the money.", "Mixed feelings about this {product}.",
    "It is a fine {product}, does the job.",
]
NEUTRAL_ASPECTS = [
    "The {aspect} is fine but could be better.", "The {aspect} is average.",
    "The {aspect} is acceptable for everyday use.", "The {aspect} is okay, not amazing.",
    "The {aspect} is decent for what it is.",
]
NEUTRAL_CLOSERS = [
    "It is alright overall.", "Might look for something else next time.",
    "Does what it says, no more.", "Okay for the price.",
]
SERVICE_PROBLEMS = [
    "Delivery was late by a week and the box arrived damaged.",
    "The shipping took almost a month.",
    "Customer service never answered my emails.",
    "Customer service was rude when I called about it.",
    "The parcel was left in the rain by the courier.",
]
TITLES = {
    "positive": ["Love it", "Great buy", "Excellent", "Highly recommended", "Very happy",
                 "Does the job perfectly"],
    "negative": ["Disappointed", "Broke quickly", "Waste of money", "Avoid",
                 "Returned it", "Poor quality"],
    "neutral": ["Okay", "Average", "Mixed feelings", "Decent", "Fine for the price"],
}
PARTS = {
    "positive": (POSITIVE_OPENERS, POSITIVE_ASPECTS, POSITIVE_CLOSERS),
    "negative": (NEGATIVE_OPENERS, NEGATIVE_ASPECTS, NEGATIVE_CLOSERS),
    "neutral": (NEUTRAL_OPENERS, NEUTRAL_ASPECTS, NEUTRAL_CLOSERS),
}
RATINGS = {"positive": (4, 5), "negative": (1, 2), "neutral": (3, 3)}


def review(rng: random.Random, number: int) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    kind = rng.choices(["positive", "negative", "neutral"], weights=[55, 30, 15])[0]
    openers, aspect_lines, closers = PARTS[kind]
    aspects = rng.sample(PRODUCTS[product], k=rng.randint(1, 3))
    sentences = [rng.choice(openers).format(product=product)]
    sentences += [rng.choice(aspect_lines).format(aspect=a) for a in aspects]
    if rng.random() < 0.05:
        sentences.append(rng.choice(SERVICE_PROBLEMS))
    if rng.random() < 0.7:
        sentences.append(rng.choice(closers))
    return {"id": f"r{number:05d}", "product": product, "rating": rng.randint(*RATINGS[kind]),
            "title": rng.choice(TITLES[kind]), "text": " ".join(sentences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2400)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("reviews.jsonl"))
    args = parser.parse_args()
    rng = random.Random(2026)
    with open(args.out, "w", encoding="utf-8") as out:
        for number in range(1, args.count + 1):
            out.write(json.dumps(review(rng, number), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
