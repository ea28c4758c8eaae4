#!/usr/bin/env python3
"""Generate the embedded default preference set (deterministic; stdlib only).

Eleven task families (arithmetic, capitals, case transforms, letter counts, lists of N items, yes/no
comparisons, unit conversion, sorting, JSON records, antonyms). Chosen answers are correct, short and
follow the requested format exactly; rejected answers ramble, hedge, ignore the format or are wrong, so
the preference shows in style as well as content. Train and held-out rows use disjoint phrasings,
numbers and items, so held-out accuracy measures generalisation rather than memorisation.

    python scripts/make_default_dataset.py                 # rewrite dpocache/resources/default_prefs/
    python scripts/make_default_dataset.py --check         # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dpocache" / "resources" / "default_prefs"
SEED = 20261124
N_TRAIN, N_HELDOUT = 640, 128
MAX_DRAWS = 20  # attempts at a new (unique) prompt for a task before moving on to the next task

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
# Short digressions: a rambling rejected answer is one of these plus a hedged wrong answer.
RAMBLE = ["Hmm, that is a tricky one, let me think.", "Great question! There are many ways to see it.",
          "Well, it depends on how you look at it.", "I am not totally sure about this one.",
          "Let me think out loud for a moment here.", "Interesting! People often get this wrong."]
HEDGES = ["I think, but I could be wrong.", "probably, though I am not sure.", "or something close to that.",
          "if I remember correctly."]
SYSTEMS = ["Be concise.", "Answer exactly what is asked.", "Follow the instructions."]

# Prompt phrasings per task: (training phrasings, held-out phrasings). Held-out rows use only phrasings
# never seen in training, with numbers and items from disjoint pools.
PHRASES = {
    "addition": (["What is {a} + {b}? Reply with the number only.", "Add {a} and {b}. Give only the result."],
                 ["Compute {a} plus {b}. Answer with just the number.", "{a} + {b} = ? Number only."]),
    "multiplication": (["What is {a} times {b}? Reply with the number only.", "Multiply {a} by {b}. Number only."],
                       ["Compute {a} x {b}. Give just the number.", "What do you get from {a} * {b}? Number only."]),
    "capital": (["What is the capital of {c}? Answer in one word or name.",
                 "Name the capital city of {c}. Just the name."],
                ["{c}'s capital city? Reply with the name only.", "Which city is the capital of {c}? Name only."]),
    "case": (["Write the word \"{w}\" in {case} letters only.", "Convert \"{w}\" to {case}. Reply with the word only."],
             ["Rewrite \"{w}\" using only {case} letters.", "Give \"{w}\" in {case}, nothing else."]),
    "letters": (["How many letters are in the word \"{w}\"? Reply with a number.",
                 "Count the letters in \"{w}\". Number only."],
                ["What is the letter count of \"{w}\"? Just the number.", "\"{w}\": how many letters? Number only."]),
    "listing": (["List exactly {n} {cat}, separated by commas.", "Name {n} {cat}. Comma-separated, nothing else."],
                ["Give me {n} {cat} as a comma-separated list.", "Write a list of exactly {n} {cat}, with commas."]),
    "compare": (["Is {a} greater than {b}? Answer yes or no.", "Is {a} larger than {b}? Reply yes or no."],
                ["Yes or no: is {a} bigger than {b}?", "Does {a} exceed {b}? Answer yes or no."]),
    "meters": (["How many centimeters are in {m} meters? Reply with a number.", "Convert {m} m to cm. Number only."],
               ["{m} meters is how many centimeters? Just the number.",
                "Express {m} meters in centimeters. Number only."]),
    "sorting": (["Sort these numbers from smallest to largest: {xs}.", "Put in ascending order: {xs}."],
                ["Order from lowest to highest: {xs}.", "Arrange in increasing order: {xs}."]),
    "json_record": (["Return a JSON object with keys \"name\" and \"age\" for {name}, aged {age}. Output only JSON.",
                     "Output JSON with \"name\" and \"age\": {name} is {age}. JSON only."],
                    ["{name} is {age} years old. Reply with only a JSON object with keys \"name\" and \"age\".",
                     "As JSON only, with keys \"name\" and \"age\": {name}, {age} years."]),
    "opposite": (["Give one word that means the opposite of \"{w}\".", "What is the opposite of \"{w}\"? One word."],
                 ["One word only: the antonym of \"{w}\".", "Name the opposite of \"{w}\" in one word."]),
}
TASKS = tuple(PHRASES)


def split_half(items, rng, heldout_share=0.25):
    """Shuffle ``items`` and split them into (training pool, held-out pool)."""
    items = list(items)
    rng.shuffle(items)
    k = max(1, int(len(items) * heldout_share))
    return items[k:], items[:k]


class Generator:
    """One split's rows. Each task returns (prompt, chosen answer, rejected answer)."""

    def __init__(self, rng: random.Random, split: int, pools: dict, numbers: range):
        self.rng, self.split, self.pools, self.numbers = rng, split, pools, numbers

    def num(self):
        return self.rng.choice(self.numbers)

    def ask(self, task: str, **fields) -> str:
        return self.rng.choice(PHRASES[task][self.split]).format(**fields)

    def bad(self, wrong: str, ignored: str) -> str:
        """Rambling and wrong, format ignored (right content, wrong form), hedged and wrong, or just wrong."""
        roll = self.rng.random()
        if roll < 0.35:
            return f"{self.rng.choice(RAMBLE)} Maybe {wrong.rstrip('.')}?"
        if roll < 0.7:
            return ignored
        if roll < 0.9:
            return f"{wrong.rstrip('.')}, {self.rng.choice(HEDGES)}"
        return wrong

    def addition(self):
        a, b = self.num(), self.num()
        wrong = a + b + self.rng.choice([-11, -2, -1, 1, 3, 10])
        ignored = f"Adding {a} and {b} step by step, the total comes out to {a + b}."
        return self.ask("addition", a=a, b=b), f"{a + b}", self.bad(f"{wrong}", ignored)

    def multiplication(self):
        a, b = self.rng.randint(2, 9), self.num()
        wrong = a * b + self.rng.choice([-a, a, 1, -1])
        ignored = f"If you multiply {a} by {b}, you end up with {a * b} in total."
        return self.ask("multiplication", a=a, b=b), f"{a * b}", self.bad(f"{wrong}", ignored)

    def capital(self):
        country, city = self.rng.choice(self.pools["capitals"])
        wrong = self.rng.choice([c for _, c in CAPITALS if c != city])
        ignored = f"The capital of {country} is {city}, a city with a long and rich history."
        return self.ask("capital", c=country), city, self.bad(wrong, ignored)

    def case(self):
        w = self.rng.choice(self.pools["words"])
        upper = self.rng.random() < 0.6
        if not upper:  # lowercase requests start from an uppercase or capitalised word
            w = w.upper() if self.rng.random() < 0.5 else w.capitalize()
        right = w.upper() if upper else w.lower()
        wrong = w.capitalize() if upper or w == w.upper() else w.upper()
        ignored = f"Sure! Here is your word written out: {w}. Let me know if you need more."
        return self.ask("case", w=w, case="uppercase" if upper else "lowercase"), right, self.bad(wrong, ignored)

    def letters(self):
        w = self.rng.choice(self.pools["words"])
        wrong = len(w) + self.rng.choice([-2, -1, 1, 2])
        ignored = f"The word \"{w}\" has {len(w)} letters if you count each one carefully."
        return self.ask("letters", w=w), f"{len(w)}", self.bad(f"{wrong}", ignored)

    def listing(self):
        cat = self.rng.choice(self.pools["categories"])
        n = self.rng.randint(2, 5)
        items = self.rng.sample(CATEGORIES[cat], n + 2)
        ignored = f"There are so many {cat}! Some like {items[0]}, others {items[1]}, and the list goes on."
        return self.ask("listing", n=n, cat=cat), ", ".join(items[:n]), self.bad(", ".join(items), ignored)

    def compare(self):
        a, b = self.num(), self.num()
        while a == b:
            b = self.num()
        right, wrong = ("Yes.", "No.") if a > b else ("No.", "Yes.")
        ignored = f"Both {a} and {b} are interesting numbers, so it really depends on the context."
        return self.ask("compare", a=a, b=b), right, self.bad(wrong, ignored)

    def meters(self):
        m = self.num()
        ignored = f"Since one meter has 100 centimeters, {m} meters would be {m * 100} centimeters."
        return self.ask("meters", m=m), f"{m * 100}", self.bad(f"{m * self.rng.choice([10, 1000])}", ignored)

    def sorting(self):
        xs = self.rng.sample(list(self.numbers), 4)
        shuffled = xs[:]
        self.rng.shuffle(shuffled)
        ys = sorted(xs)
        wrong = ", ".join(map(str, [ys[1], ys[0]] + ys[2:]))
        ignored = f"The smallest of these is {ys[0]} and the largest is {ys[-1]}; the rest are in between."
        return self.ask("sorting", xs=", ".join(map(str, shuffled))), ", ".join(map(str, ys)), self.bad(wrong, ignored)

    def json_record(self):
        name, age = self.rng.choice(self.pools["names"]), self.rng.randint(18, 90)
        ignored = f"{name} is a person who is {age} years old, which is a wonderful age."
        return (self.ask("json_record", name=name, age=age), json.dumps({"name": name, "age": age}),
                self.bad(f"{{name: {name}}}", ignored))

    def opposite(self):
        w, o = self.rng.choice(self.pools["opposites"])
        wrong = self.rng.choice([x for x, _ in OPPOSITES if x not in (w, o)])
        ignored = f"A word that is kind of the opposite of \"{w}\" might be {o}, or something similar."
        return self.ask("opposite", w=w), f"{o.capitalize()}.", self.bad(f"{wrong.capitalize()}.", ignored)

    def row(self, task: str) -> dict:
        prompt, good, bad = getattr(self, task)()
        # Most rows are a single user turn (the chat template supplies its default system prompt); one
        # in ten carries a short system message and one in ten an earlier exchange.
        messages = []
        if self.rng.random() < 0.1:
            messages.append({"role": "system", "content": self.rng.choice(SYSTEMS)})
        if self.rng.random() < 0.1:
            warm_q, warm_a, _ = self.addition()
            messages += [{"role": "user", "content": warm_q}, {"role": "assistant", "content": warm_a}]
        messages.append({"role": "user", "content": prompt})
        return {"category": task,
                "chosen": messages + [{"role": "assistant", "content": good}],
                "rejected": messages + [{"role": "assistant", "content": bad}]}


def build() -> dict[str, list[dict]]:
    """Both splits' rows. Items (countries, words, antonyms, names, categories), numbers and phrasings
    are disjoint between train and held-out; user prompts are unique within a split."""
    rng = random.Random(SEED)
    caps, words, opps, names = (split_half(x, rng) for x in (CAPITALS, WORDS, OPPOSITES, NAMES))
    cats = split_half(sorted(CATEGORIES), rng, heldout_share=0.34)
    gens = {
        "train": (N_TRAIN, Generator(random.Random(SEED + 1), 0, {
            "capitals": caps[0], "words": words[0], "opposites": opps[0], "names": names[0],
            "categories": cats[0]}, range(2, 60))),
        "heldout": (N_HELDOUT, Generator(random.Random(SEED + 2), 1, {
            "capitals": caps[1], "words": words[1], "opposites": opps[1], "names": names[1],
            "categories": cats[1]}, range(60, 100))),
    }
    splits = {}
    for split, (n, gen) in gens.items():
        rows, seen, slot = [], set(), 0
        while len(rows) < n:
            if slot >= 10 * n:
                raise RuntimeError(f"{split}: only {len(rows)} distinct prompts for {n} rows; widen the pools")
            task = TASKS[slot % len(TASKS)]  # tasks in turn; a task whose prompts run out gets fewer rows
            slot += 1
            for _ in range(MAX_DRAWS):
                row = gen.row(task)
                question = row["chosen"][-2]["content"]
                if question not in seen and row["chosen"][-1] != row["rejected"][-1]:
                    seen.add(question)
                    rows.append({"id": f"{split}-{len(rows):04d}", **row})
                    break
        splits[split] = rows
    return splits


def generate(out: Path) -> list[Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out`` (each via a temporary file and a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in build().items():
        path = out / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def check(out: Path) -> list[str]:
    """Names of the files in ``out`` that differ from (or are missing compared with) a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [f.name for f in fresh if not (out / f.name).is_file()
                or (out / f.name).read_bytes() != f.read_bytes()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="output directory (default: the package's copy)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate to a temporary directory and compare byte for byte with --out")
    args = parser.parse_args(argv)
    if args.check:
        stale = check(args.out)
        if stale:
            print(f"{args.out}: {', '.join(stale)} differ from the generator's output; "
                  f"run scripts/make_default_dataset.py to regenerate", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    for path in generate(args.out):
        print(f"wrote {path} ({sum(1 for _ in path.open(encoding='utf-8'))} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
