#!/usr/bin/env python3
"""Generates lift's own small arithmetic training and test sets.

    python3 data/make_math.py            # writes data/math.json and data/math_test.json
    python3 data/make_math.py --check    # regenerates in memory, fails if the files differ

Pure standard library and deterministic: the same script writes the same bytes
on every machine and Python 3 version. It uses its own SplitMix64 generator
(the one in src/data.rs) rather than `random`, whose `choice`, `randrange` and
`sample` Python does not promise to keep stable across versions.

Format: LLM-Adapters JSON, a list of
    {"instruction": problem, "input": "", "output": worked solution, "answer": "N"}
where the solution is one or two short sentences of arithmetic ending in
"The answer is N." and N is an integer (the numbers are drawn so that every
division comes out even). Some problems write thousands with commas
("12,450 people"); the answer field never has commas.

math.json (train) and math_test.json (test) come from different seeds, no
test problem appears in the training set, and a few templates are used only
in the test set (TEST_ONLY below), so the test also measures a little
transfer to unseen phrasings. Solutions are kept short because `make train`
fine-tunes SmolLM2-135M on a CPU in about ten minutes.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_SIZE, TRAIN_SEED = 1000, 20250101
TEST_SIZE, TEST_SEED = 200, 20250202

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack",
         "Kira", "Leo", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
         "Umar", "Vera", "Will", "Xena", "Yusuf", "Zoe"]
ITEMS = [("pencil", "pencils"), ("apple", "apples"), ("notebook", "notebooks"),
         ("sticker", "stickers"), ("cookie", "cookies"), ("marble", "marbles"),
         ("card", "cards"), ("balloon", "balloons"), ("book", "books"), ("shell", "shells")]
SHOP_ITEMS = [("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
              ("mug", "mugs"), ("plant", "plants"), ("toy car", "toy cars"),
              ("bag of rice", "bags of rice"), ("shirt", "shirts")]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("basket", "baskets"),
              ("jar", "jars"), ("tray", "trays")]


class Rng:
    """SplitMix64, as `Rng` in src/data.rs, with the few draws used here."""

    MASK = (1 << 64) - 1

    def __init__(self, seed):
        self.state = seed & self.MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def below(self, n):
        """Uniform in range(n), without modulo bias (Lemire's method, as Rng::below)."""
        threshold = ((1 << 64) - n) % n
        while True:
            m = self.next_u64() * n
            if (m & self.MASK) >= threshold:
                return m >> 64

    def randint(self, lo, hi):
        """Uniform in lo..=hi."""
        return lo + self.below(hi - lo + 1)

    def randrange(self, lo, hi, step):
        return lo + step * self.below((hi - lo + step - 1) // step)

    def choice(self, xs):
        return xs[self.below(len(xs))]

    def shuffle(self, xs):
        """Fisher-Yates, as Rng::shuffle."""
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]

    def sample(self, xs, k):
        xs = list(xs)
        self.shuffle(xs)
        return xs[:k]


def commas(n):
    """12450 -> '12,450'."""
    return f"{n:,}"


def two_names(r):
    a = r.choice(NAMES)
    b = r.choice([n for n in NAMES if n != a])
    return a, b


# Each template takes an Rng and returns (problem, solution, answer).

def shopping(r):
    name = r.choice(NAMES)
    (s1, p1), (s2, p2) = r.sample(SHOP_ITEMS, 2)
    a, pa = r.randint(2, 9), r.randint(2, 15)
    b, pb = r.randint(2, 9), r.randint(2, 15)
    ans = a * pa + b * pb
    q = (f"{name} buys {a} {p1} at ${pa} each and {b} {p2} at ${pb} each. "
         f"How much does {name} spend in total?")
    s = f"{a} * {pa} = {a * pa} and {b} * {pb} = {b * pb}, so {name} spends {a * pa} + {b * pb} = {ans} dollars."
    return q, s, ans


def change(r):
    name = r.choice(NAMES)
    _, plural = r.choice(SHOP_ITEMS)
    n, price = r.randint(2, 8), r.randint(2, 12)
    cost = n * price
    bill = r.choice([b for b in (20, 50, 100) if b > cost] or [200])
    ans = bill - cost
    q = f"{name} pays for {n} {plural} costing ${price} each with a ${bill} bill. How much change does {name} get?"
    s = f"The {plural} cost {n} * {price} = {cost} dollars, so the change is {bill} - {cost} = {ans} dollars."
    return q, s, ans


def sharing(r):
    name = r.choice(NAMES)
    _, plural = r.choice(ITEMS)
    k, each = r.randint(2, 9), r.randint(2, 12)
    total = k * each
    q = f"{name} has {total} {plural} and shares them equally among {k} friends. How many {plural} does each friend get?"
    s = f"Each friend gets {total} / {k} = {each} {plural}."
    return q, s, each


def share_after_giving(r):
    name = r.choice(NAMES)
    _, plural = r.choice(ITEMS)
    k, each, gone = r.randint(2, 8), r.randint(2, 10), r.randint(1, 15)
    rest = k * each
    total = rest + gone
    q = (f"{name} had {total} {plural}, gave {gone} of them away, and split the rest equally into {k} bags. "
         f"How many {plural} are in each bag?")
    s = f"{total} - {gone} = {rest} are left, and {rest} / {k} = {each} go in each bag."
    return q, s, each


def ages_older(r):
    a, b = two_names(r)
    age, diff, years = r.randint(4, 40), r.randint(2, 30), r.randint(2, 15)
    ans = age + diff + years
    q = f"{a} is {age} years old. {b} is {diff} years older than {a}. How old will {b} be in {years} years?"
    s = f"{b} is {age} + {diff} = {age + diff} now, so in {years} years {b} will be {age + diff} + {years} = {ans}."
    return q, s, ans


def ages_times(r):
    a, b = two_names(r)
    age, m = r.randint(3, 20), r.randint(2, 4)
    ans = age + m * age
    q = f"{a} is {age} years old and {b} is {m} times as old as {a}. What is the sum of their ages?"
    s = f"{b} is {m} * {age} = {m * age} years old, so the sum is {age} + {m * age} = {ans}."
    return q, s, ans


def speed(r):
    name = r.choice(NAMES)
    how = r.choice(["drives", "cycles", "rides a train"])
    v, h = r.randint(8, 90), r.randint(2, 9)
    ans = v * h
    q = f"{name} {how} at {v} kilometers per hour for {h} hours. How many kilometers does {name} travel?"
    s = f"{name} travels {v} * {h} = {ans} kilometers."
    return q, s, ans


def wages(r):
    name = r.choice(NAMES)
    rate, hours = r.randint(8, 30), r.randint(3, 40)
    earned = rate * hours
    spent = r.randint(1, earned - 1)
    ans = earned - spent
    q = f"{name} earns ${rate} an hour and works {hours} hours. Then {name} spends ${spent}. How much money is left?"
    s = f"{name} earns {rate} * {hours} = {earned} dollars, and {earned} - {spent} = {ans} dollars are left."
    return q, s, ans


def add_sub(r):
    name = r.choice(NAMES)
    _, plural = r.choice(ITEMS)
    have, got = r.randint(5, 80), r.randint(2, 60)
    lost = r.randint(1, have + got - 1)
    ans = have + got - lost
    verb = r.choice(["gives away", "loses", "uses"])
    q = f"{name} has {have} {plural}, gets {got} more, and then {verb} {lost}. How many {plural} does {name} have now?"
    s = f"{have} + {got} = {have + got}, and {have + got} - {lost} = {ans}."
    return q, s, ans


def groups(r):
    name = r.choice(NAMES)
    c_single, c_plural = r.choice(CONTAINERS)
    _, plural = r.choice(ITEMS)
    n, per, loose = r.randint(2, 12), r.randint(3, 24), r.randint(1, 20)
    ans = n * per + loose
    q = (f"{name} has {n} {c_plural} with {per} {plural} in each {c_single}, and {loose} more {plural} on the table. "
         f"How many {plural} does {name} have?")
    s = f"{n} * {per} = {n * per}, plus {loose} is {ans}."
    return q, s, ans


def packing(r):
    _, plural = r.choice(ITEMS)
    c_single, c_plural = r.choice(CONTAINERS)
    per, n = r.randint(3, 25), r.randint(2, 40)
    total = per * n
    q = f"A shop packs {total} {plural} into {c_plural} of {per}. How many {c_plural} does it fill?"
    s = f"It fills {total} / {per} = {n} {c_plural}."
    return q, s, n


def population(r):
    town = r.choice(["Millbrook", "Ashford", "Riverton", "Lakeside", "Oakdale", "Fairview"])
    pop = r.randrange(5000, 90000, 10)
    left, came = r.randrange(200, 4000, 10), r.randrange(200, 4000, 10)
    ans = pop - left + came
    q = (f"{town} has {commas(pop)} people. This year {commas(left)} people moved away and "
         f"{commas(came)} moved in. How many people live in {town} now?")
    s = f"{commas(pop)} - {commas(left)} = {commas(pop - left)}, and {commas(pop - left)} + {commas(came)} = {commas(ans)}."
    return q, s, ans


def big_purchase(r):
    thing = r.choice(["laptops", "bikes", "sofas", "phones", "desks"])
    n, price = r.randint(2, 9), r.randrange(1000, 4000, 50)
    ans = n * price
    q = f"A company buys {n} {thing} for ${commas(price)} each. How much does it pay?"
    s = f"It pays {n} * {commas(price)} = {commas(ans)} dollars."
    return q, s, ans


def fraction(r):
    name = r.choice(NAMES)
    _, plural = r.choice(ITEMS)
    word, d = r.choice([("half", 2), ("a third", 3), ("a quarter", 4), ("a fifth", 5)])
    total = d * r.randint(2, 20)
    part = total // d
    ans = total - part
    q = f"{name} has {total} {plural} and gives {word} of them to a friend. How many {plural} does {name} keep?"
    s = f"{name} gives away {total} / {d} = {part}, and keeps {total} - {part} = {ans}."
    return q, s, ans


def savings(r):
    name = r.choice(NAMES)
    per, weeks = r.randint(3, 40), r.randint(2, 20)
    goal = per * weeks
    thing = r.choice(["a bike", "a game", "a guitar", "a camera", "new shoes"])
    q = f"{name} saves ${per} every week to buy {thing} that costs ${goal}. How many weeks does it take?"
    s = f"It takes {goal} / {per} = {weeks} weeks."
    return q, s, weeks


# Held out: these appear only in the test set.

def rectangle(r):
    w, h = r.randint(2, 30), r.randint(2, 30)
    what, ask = r.choice([("area", "area"), ("perimeter", "perimeter")])
    if what == "area":
        ans = w * h
        s = f"The area is {w} * {h} = {ans} square meters."
    else:
        ans = 2 * (w + h)
        s = f"The perimeter is 2 * ({w} + {h}) = {ans} meters."
    q = f"A garden is {w} meters long and {h} meters wide. What is its {ask} in {'square meters' if what == 'area' else 'meters'}?"
    return q, s, ans


def how_many_more(r):
    a, b = two_names(r)
    _, plural = r.choice(ITEMS)
    x = r.randint(5, 90)
    y = r.randint(x + 1, x + 60)
    ans = y - x
    q = f"{a} has {x} {plural} and {b} has {y} {plural}. How many more {plural} does {b} have than {a}?"
    s = f"{b} has {y} - {x} = {ans} more {plural}."
    return q, s, ans


def minutes(r):
    name = r.choice(NAMES)
    per_day, days = r.choice([15, 20, 30, 45, 60, 90]), r.randint(2, 12)
    total = per_day * days
    while total % 60:
        days += 1
        total = per_day * days
    ans = total // 60
    q = f"{name} practices piano for {per_day} minutes a day for {days} days. How many hours is that?"
    s = f"{per_day} * {days} = {total} minutes, and {total} / 60 = {ans} hours."
    return q, s, ans


TRAIN_TEMPLATES = [shopping, change, sharing, share_after_giving, ages_older, ages_times, speed, wages,
                   add_sub, groups, packing, population, big_purchase, fraction, savings]
TEST_ONLY = [rectangle, how_many_more, minutes]


def example(problem, solution, answer):
    return {"instruction": problem, "input": "", "output": f"{solution} The answer is {answer}.", "answer": str(answer)}


def generate(templates, n, seed, exclude=frozenset()):
    """n distinct examples, templates in turn (so each gets an equal share)."""
    r = Rng(seed)
    out, seen = [], set(exclude)
    i = 0
    while len(out) < n:
        q, s, a = templates[i % len(templates)](r)
        i += 1
        assert isinstance(a, int) and a >= 0, (q, a)
        if q in seen:
            continue
        seen.add(q)
        out.append(example(q, s, a))
    return out


def dump(examples):
    """One example per line inside the list: small, and readable in a diff."""
    return "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in examples) + "\n]\n"


def build():
    train = generate(TRAIN_TEMPLATES, TRAIN_SIZE, TRAIN_SEED)
    train_problems = frozenset(e["instruction"] for e in train)
    # Two thirds from the training templates (new problems), one third held-out templates.
    n_held = TEST_SIZE // 3
    test = generate(TRAIN_TEMPLATES, TEST_SIZE - n_held, TEST_SEED, exclude=train_problems)
    test += generate(TEST_ONLY, n_held, TEST_SEED + 1)
    Rng(TEST_SEED + 2).shuffle(test)
    return {"math.json": dump(train), "math_test.json": dump(test)}


def main():
    files = build()
    if sys.argv[1:] == ["--check"]:
        stale = [n for n, text in files.items() if (HERE / n).read_text(encoding="utf-8") != text]
        if stale:
            sys.exit(f"out of date (rerun data/make_math.py): {', '.join(stale)}")
        print("data/math.json and data/math_test.json are up to date")
        return
    for name, text in files.items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote data/{name}: {len(json.loads(text))} examples, {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
