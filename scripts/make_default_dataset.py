#!/usr/bin/env python3
"""Generate the embedded default preference set (deterministic; stdlib only).

Chosen answers are correct, concise and follow the requested format; rejected answers are wrong,
rambling, or ignore the format. Train and held-out prompts are disjoint (different numbers, words and
countries), so held-out accuracy measures generalisation.

    python scripts/make_default_dataset.py                 # rewrite dpocache/resources/default_prefs/
    python scripts/make_default_dataset.py --check         # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dpocache" / "resources" / "default_prefs"
SEED = 20261124
N_TRAIN, N_HELDOUT = 640, 128

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Cuba", "Havana"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Mexico", "Mexico City"),
            ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Nigeria", "Abuja"),
            ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
            ("Switzerland", "Bern"), ("Netherlands", "Amsterdam"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
            ("Czechia", "Prague"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Nepal", "Kathmandu"),
            ("Pakistan", "Islamabad"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
            ("South Korea", "Seoul"), ("Ethiopia", "Addis Ababa"), ("Senegal", "Dakar"), ("Iceland", "Reykjavik"),
            ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Bolivia", "La Paz"), ("Uruguay", "Montevideo"),
            ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Qatar", "Doha")]
WORDS = ["apple", "river", "garden", "window", "silver", "planet", "candle", "forest", "bridge", "rocket",
         "pencil", "orange", "castle", "dragon", "monkey", "guitar", "winter", "summer", "yellow", "purple",
         "basket", "button", "camera", "doctor", "engine", "flower", "hammer", "island", "jacket", "kitten",
         "ladder", "magnet", "napkin", "oyster", "parrot", "rabbit", "saddle", "tomato", "violin", "walnut",
         "anchor", "bottle", "carpet", "dinner", "falcon", "ginger", "helmet", "jungle", "lemon", "mirror",
         "needle", "pepper", "puzzle", "shadow", "spider", "tunnel", "turtle", "wallet", "zipper", "cookie"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("early", "late"), ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
             ("young", "old"), ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"),
             ("up", "down"), ("win", "lose"), ("begin", "end"), ("push", "pull"), ("inside", "outside"),
             ("clean", "dirty"), ("thick", "thin"), ("heavy", "light"), ("true", "false"), ("near", "far"),
             ("buy", "sell"), ("first", "last"), ("always", "never"), ("add", "subtract"), ("accept", "refuse")]
CATEGORIES = {"fruits": ["apple", "banana", "cherry", "grape", "mango", "pear", "plum", "kiwi", "lemon", "peach"],
              "colors": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"],
              "animals": ["dog", "cat", "horse", "lion", "tiger", "bear", "wolf", "fox", "deer", "rabbit"],
              "vegetables": ["carrot", "potato", "onion", "pea", "corn", "bean", "leek", "kale", "beet", "radish"],
              "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
              "instruments": ["piano", "violin", "flute", "drum", "guitar", "cello", "harp", "trumpet", "oboe"]}
NAMES = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wen", "Yusuf"]
RAMBLE = ["Well, that is a really interesting question and there are many ways to think about it.",
          "Hmm, let me think about this for a while, because it is not as simple as it looks.",
          "Great question! Before answering, it is worth considering the broader context here.",
          "I am not completely sure, but I will try my best to give you a helpful answer.",
          "There are a lot of factors to consider, so let me walk through my reasoning slowly."]
SYSTEMS = ["Be concise.", "Answer exactly what is asked.", "Follow the instructions."]


def split_half(items, rng, heldout_share=0.25):
    items = list(items)
    rng.shuffle(items)
    k = max(1, int(len(items) * heldout_share))
    return items[k:], items[:k]


class Generator:
    def __init__(self, rng: random.Random, pools: dict, numbers: range):
        self.rng, self.pools, self.numbers = rng, pools, numbers

    def num(self):
        return self.rng.choice(self.numbers)

    def ramble(self, answer: str) -> str:
        return f"{self.rng.choice(RAMBLE)} {self.rng.choice(RAMBLE)} In the end, I would say {answer}, maybe."

    def bad(self, wrong: str, ignored_format: str | None = None) -> str:
        roll = self.rng.random()
        if roll < 0.45:
            return self.ramble(wrong)
        if roll < 0.75 and ignored_format:
            return ignored_format
        return f"{wrong}. I think, although I could be wrong about this."

    def addition(self):
        a, b = self.num(), self.num()
        wrong = str(a + b + self.rng.choice([-11, -2, -1, 1, 3, 10]))
        return f"What is {a} + {b}? Reply with the number only.", f"{a + b}", self.bad(wrong)

    def multiplication(self):
        a, b = self.rng.randint(2, 9), self.num()
        wrong = str(a * b + self.rng.choice([-a, a, 1, -1]))
        return f"What is {a} times {b}? Reply with the number only.", f"{a * b}", self.bad(wrong)

    def capital(self):
        country, city = self.rng.choice(self.pools["capitals"])
        wrong = self.rng.choice([c for _, c in CAPITALS if c != city])
        return f"What is the capital of {country}? Answer in one word or name.", f"{city}", self.bad(wrong)

    def uppercase(self):
        w = self.rng.choice(self.pools["words"])
        ignored = f"Sure! Here is your word written out: {w}. Let me know if you need anything else."
        return f"Write the word \"{w}\" in uppercase letters only.", w.upper(), self.bad(w.capitalize(), ignored)

    def letters(self):
        w = self.rng.choice(self.pools["words"])
        wrong = str(len(w) + self.rng.choice([-2, -1, 1, 2]))
        return f"How many letters are in the word \"{w}\"? Reply with a number.", f"{len(w)}", self.bad(wrong)

    def listing(self):
        cat = self.rng.choice(self.pools["categories"])
        n = self.rng.randint(2, 4)
        items = self.rng.sample(CATEGORIES[cat], n + 2)
        ignored = f"There are so many {cat}! Some people like {items[0]}, others prefer {items[1]}, and honestly " \
                  f"the list could go on forever."
        return (f"List exactly {n} {cat}, separated by commas.", ", ".join(items[:n]),
                self.bad(", ".join(items[: n + 2]), ignored))

    def compare(self):
        a, b = self.num(), self.num()
        while a == b:
            b = self.num()
        right, wrong = ("Yes", "No") if a > b else ("No", "Yes")
        ignored = f"Numbers like {a} and {b} are both interesting in their own way, so it really depends."
        return f"Is {a} greater than {b}? Answer yes or no.", f"{right}.", self.bad(wrong.lower(), ignored)

    def meters(self):
        m = self.num()
        wrong = str(m * 10)
        return (f"How many centimeters are in {m} meters? Reply with a number.", f"{m * 100}",
                self.bad(wrong))

    def sorting(self):
        xs = self.rng.sample(list(self.numbers), 4)
        shuffled = xs[:]
        self.rng.shuffle(shuffled)
        ys = sorted(xs)
        wrong = ", ".join(map(str, [ys[1], ys[0]] + ys[2:]))
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, shuffled))}.",
                ", ".join(map(str, ys)), self.bad(wrong))

    def json_record(self):
        name, age = self.rng.choice(self.pools["names"]), self.rng.randint(18, 90)
        ignored = f"{name} is a person who is {age} years old, which is a wonderful age to be."
        return (f"Return a JSON object with keys \"name\" and \"age\" for {name}, aged {age}. Output only JSON.",
                json.dumps({"name": name, "age": age}), self.bad(f"{{name: {name}}}", ignored))

    def opposite(self):
        w, o = self.rng.choice(self.pools["opposites"])
        wrong = self.rng.choice([x for x, _ in OPPOSITES if x != w])
        return f"Give one word that means the opposite of \"{w}\".", f"{o.capitalize()}.", self.bad(wrong)

    TASKS = ("addition", "multiplication", "capital", "uppercase", "letters", "listing", "compare", "meters",
             "sorting", "json_record", "opposite")

    def row(self, i: int, split: str) -> dict:
        task = self.TASKS[i % len(self.TASKS)]
        prompt, good, bad = getattr(self, task)()
        # A short system message on every row (it also replaces long default system prompts that some
        # chat templates insert, keeping sequences short); one row in ten carries an earlier exchange.
        messages = [{"role": "system", "content": self.rng.choice(SYSTEMS)}]
        if self.rng.random() < 0.1:
            warm_q, warm_a, _ = self.addition()
            messages += [{"role": "user", "content": warm_q}, {"role": "assistant", "content": warm_a}]
        messages.append({"role": "user", "content": prompt})
        return {"id": f"{split}-{i:04d}", "category": task,
                "chosen": messages + [{"role": "assistant", "content": good}],
                "rejected": messages + [{"role": "assistant", "content": bad}]}


def generate(out: Path) -> None:
    rng = random.Random(SEED)
    caps = split_half(CAPITALS, rng)
    words = split_half(WORDS, rng)
    opps = split_half(OPPOSITES, rng)
    names = split_half(NAMES, rng)
    cats = split_half(sorted(CATEGORIES), rng, heldout_share=0.34)
    splits = {
        "train": (N_TRAIN, Generator(random.Random(SEED + 1), {"capitals": caps[0], "words": words[0],
                  "opposites": opps[0], "names": names[0], "categories": cats[0]}, range(2, 60))),
        "heldout": (N_HELDOUT, Generator(random.Random(SEED + 2), {"capitals": caps[1], "words": words[1],
                    "opposites": opps[1], "names": names[1], "categories": cats[1]}, range(60, 100))),
    }
    out.mkdir(parents=True, exist_ok=True)
    for split, (n, gen) in splits.items():
        rows, seen = [], set()
        i = 0
        while len(rows) < n:
            row = gen.row(i, split)
            i += 1
            key = json.dumps(row["chosen"][:-1])
            if key in seen or row["chosen"][-1] == row["rejected"][-1]:
                continue
            seen.add(key)
            row["id"] = f"{split}-{len(rows):04d}"
            rows.append(row)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare a fresh generation with --out")
    args = parser.parse_args()
    if not args.check:
        generate(args.out)
        print(f"wrote {args.out}/train.jsonl and heldout.jsonl")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        same = all(filecmp.cmp(Path(tmp) / f, args.out / f, shallow=False) for f in ("train.jsonl", "heldout.jsonl"))
    print("default dataset is up to date" if same else "default dataset differs from its generator's output")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
