"""Sample data generated as code: a small, learnable text corpus for demos and tests."""

from __future__ import annotations

import json
import os
import random

_CITIES = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("Canada", "Ottawa"),
]
_ITEMS = ["lamp", "kettle", "bicycle", "notebook", "umbrella", "backpack", "clock", "teapot"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]


def write_sample(out_dir: str, n: int = 400, seed: int = 0) -> str:
    """Writes OUT/notes.txt (a private-looking log) and OUT/qa.jsonl (prompt/completion pairs)."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for i in range(n):
        item, color = rng.choice(_ITEMS), rng.choice(_COLORS)
        country, city = rng.choice(_CITIES)
        lines.append(f"Order {1000 + i}: a {color} {item} shipped from {city}, the capital of {country}.")
    with open(os.path.join(out_dir, "notes.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "qa.jsonl"), "w") as f:
        for _ in range(n // 2):
            country, city = rng.choice(_CITIES)
            f.write(
                json.dumps({"prompt": f"Q: What is the capital of {country}?\nA:", "completion": f" {city}."}) + "\n"
            )
    return out_dir
