"""Regenerate the bundled math word problems (MetaMathQA layout: ``query`` / ``response``).

    python data/make_math.py            # rewrites data/quickstart/{train,heldout}/math.jsonl
    python data/make_math.py OUT_DIR    # writes OUT_DIR/{train,heldout}/math.jsonl instead

Deterministic (fixed seed, no wall clock, no hash ordering): running it again gives byte-identical files, which
``tests/test_bundled_data.py`` checks. Every problem is built from random parameters by a template; the
worked solution is produced step by step with exact fractions (``calc``), and the final answer is then compared
with a second, closed-form computation from the same parameters (``check``), so a slip in either one stops the
script. Each step is written as ``a op b = c``, which the test re-evaluates independently.

Written for sparsecraft; Apache-2.0.
"""

from __future__ import annotations

import json
import random
import sys
from fractions import Fraction as F
from pathlib import Path

SEED = 20250117
PER_TYPE = 9
HERE = Path(__file__).resolve().parent

NAMES = [("Maria", "she", "her"), ("James", "he", "his"), ("Aisha", "she", "her"), ("Liam", "he", "his"),
         ("Sofia", "she", "her"), ("Noah", "he", "his"), ("Priya", "she", "her"), ("Lucas", "he", "his"),
         ("Emma", "she", "her"), ("Mateo", "he", "his"), ("Hana", "she", "her"), ("Omar", "he", "his"),
         ("Zoe", "she", "her"), ("Diego", "he", "his"), ("Fatima", "she", "her"), ("Jonas", "he", "his"),
         ("Mia", "she", "her"), ("Ethan", "he", "his"), ("Chen", "he", "his"), ("Lena", "she", "her")]


# ----------------------------------------------------------------------------------------------- formatting

def num(x) -> str:
    """Exact decimal text of a number with at most two decimal places (refuses anything else)."""
    x = F(x)
    if x.denominator == 1:
        return str(x.numerator)
    cents = x * 100
    if cents.denominator != 1:
        raise ValueError(f"{x} needs more than two decimal places")
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents.numerator), 100)
    return f"{sign}{whole}.{frac:02d}".rstrip("0")


def money(x) -> str:
    """Dollar text: ``$12`` for whole amounts, ``$4.50`` otherwise."""
    x = F(x)
    if x.denominator == 1:
        return f"${x.numerator}"
    cents = x * 100
    if cents.denominator != 1 or cents < 0:
        raise ValueError(f"{x} is not a whole number of cents")
    whole, frac = divmod(cents.numerator, 100)
    return f"${whole}.{frac:02d}"


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}


def calc(a, op, b, fmt=num, fa=None, fb=None):
    """Compute ``a op b`` exactly; return the result and the step text ``'a op b = c'``.

    ``fmt`` formats the result (and the operands unless ``fa`` / ``fb`` are given)."""
    a, b = F(a), F(b)
    r = _OPS[op](a, b)
    return r, f"{(fa or fmt)(a)} {op} {(fb or fmt)(b)} = {fmt(r)}"


WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PART = {2: "half", 3: "third", 4: "quarter", 6: "sixth", 8: "eighth"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" or word.startswith(("8", "11", "18")) else "a"


def person(rng):
    return rng.choice(NAMES)


def finish(query: str, steps: list[str], answer, check) -> dict:
    answer, check = F(answer), F(check)
    if answer != check:
        raise AssertionError(f"step-by-step {answer} != closed form {check} for: {query}")
    response = " ".join(steps) + f"\nThe answer is: {num(answer)}"
    return {"query": query, "response": response}


# ----------------------------------------------------------------------------------------------- templates
# Each generator takes the RNG and returns one record. ``check`` is always a separate closed-form expression.

ITEMS = [("notebooks", [F(2), F(3), F("3.50"), F(4)]), ("pens", [F("1.25"), F("1.50"), F(2)]),
         ("apples", [F("0.50"), F("0.75"), F(1)]), ("sandwiches", [F("4.50"), F(5), F(6)]),
         ("candles", [F(3), F("2.50"), F(4)]), ("bags of rice", [F(7), F("8.50"), F(9)]),
         ("mugs", [F(6), F("5.50"), F(8)]), ("packs of cards", [F("3.25"), F(4), F("4.75")])]


def shopping_change(rng):
    (n1, ps1), (n2, ps2) = rng.sample(ITEMS, 2)
    a, b = rng.randint(2, 6), rng.randint(2, 5)
    p1, p2 = rng.choice(ps1), rng.choice(ps2)
    total = a * p1 + b * p2
    bill = next(x for x in (10, 20, 50, 100) if x > total)
    name, she, her = person(rng)
    t = rng.randrange(3)
    if t == 0:
        q = (f"{name} buys {a} {n1} at {money(p1)} each and {b} {n2} at {money(p2)} each. "
             f"{she.capitalize()} pays with a {money(bill)} bill. How much change should {she} get back?")
    elif t == 1:
        q = (f"At the market, {name} picks up {a} {n1} costing {money(p1)} apiece and {b} {n2} costing "
             f"{money(p2)} apiece. If {she} hands the cashier {money(bill)}, how many dollars does {she} get in change?")
    else:
        q = (f"A school club bought {a} {n1} priced at {money(p1)} each and {b} {n2} priced at {money(p2)} each, "
             f"paying with a {money(bill)} bill. How much change did the club receive?")
    c1, s1 = calc(a, "×", p1, money, fa=num)
    c2, s2 = calc(b, "×", p2, money, fa=num)
    tot, s3 = calc(c1, "+", c2, money)
    ch, s4 = calc(bill, "-", tot, money)
    steps = [f"The {n1} cost {s1}.", f"The {n2} cost {s2}.", f"Together that is {s3}.",
             f"The change is {s4}."]
    return finish(q, steps, ch, bill - (a * p1 + b * p2))


def discount(rng):
    price = rng.choice([24, 36, 40, 45, 60, 72, 80, 85, 90, 120, 150, 160, 240])
    d = rng.choice([10, 15, 20, 25, 30, 40, 50])
    item = rng.choice(["jacket", "pair of boots", "backpack", "lamp", "bicycle helmet", "video game", "blender"])
    name, she, her = person(rng)
    t = rng.randrange(3)
    if t == 0:
        q = f"{article(item).capitalize()} {item} normally costs {money(price)}. It is on sale for {d}% off. What is the sale price in dollars?"
    elif t == 1:
        q = (f"{name} wants a {item} priced at {money(price)}. The store is offering a {d}% discount. "
             f"How much will {she} pay?")
    else:
        q = (f"During a sale, every price in a shop is cut by {d}%. {article(item).capitalize()} {item} was marked {money(price)} before the sale. "
             f"What does it cost now?")
    off, s1 = calc(price, "×", F(d, 100), money, fb=num)
    new, s2 = calc(price, "-", off, money)
    steps = [f"The discount is {d}% of {money(price)}: {s1}.", f"The sale price is {s2}."]
    return finish(q, steps, new, F(price) * (100 - d) / 100)


def percent_group(rng):
    t = rng.randrange(4)
    if t < 2:
        n = rng.choice([20, 25, 40, 50, 60, 80, 120, 200, 300])
        p = rng.choice([p for p in (10, 15, 20, 25, 30, 35, 40, 45, 55, 60, 65, 70, 75, 80) if n * p % 100 == 0])
        if t == 0:
            q = (f"There are {n} students in a school club, and {p}% of them are girls. How many boys are in the club?")
            what, rest = "girls", "boys"
        else:
            q = (f"In a survey of {n} people, {p}% said they prefer tea and everyone else said coffee. "
                 f"How many people prefer coffee?")
            what, rest = "people who prefer tea", "coffee drinkers"
        g, s1 = calc(n, "×", F(p, 100))
        r, s2 = calc(n, "-", g)
        steps = [f"The number of {what} is {p}% of {n}: {s1}.", f"The {rest} are the rest: {s2}."]
        return finish(q, steps, r, F(n) * (100 - p) / 100)
    n = rng.choice([20, 25, 40, 50, 80, 200])
    p = rng.choice([p for p in range(55, 100, 5) if n * p % 100 == 0])
    passed = n * p // 100
    if t == 2:
        q = f"On a quiz, {passed} out of {n} students passed. What percentage of the students passed?"
    else:
        q = (f"A gardener planted {n} seeds and {passed} of them sprouted. What percent of the seeds sprouted?")
    x, s1 = calc(passed, "×", 100)
    y, s2 = calc(x, "÷", n)
    steps = [f"The fraction is {passed} out of {n}. Multiply by 100 and divide by {n}: {s1}, and {s2}."]
    return finish(q, steps, y, F(passed, n) * 100)


def speed_distance(rng):
    t = rng.randrange(4)
    name, she, her = person(rng)
    if t < 2:
        v = rng.choice([40, 48, 52, 56, 60, 64])
        h = rng.randint(1, 4)
        m = rng.choice([15, 30, 45])
        if t == 0:
            q = (f"A car travels at a steady {v} km per hour for {h} hours and {m} minutes. How many kilometers does it go?")
        else:
            q = (f"{name} drives for {h} hours and {m} minutes at an average speed of {v} miles per hour. "
                 f"How far does {she} travel, in miles?")
        f, s1 = calc(m, "÷", 60)
        tt, s2 = calc(h, "+", f)
        d, s3 = calc(v, "×", tt)
        steps = [f"{m} minutes is {s1} hours, so the time is {s2} hours.", f"Distance = speed × time = {s3}."]
        return finish(q, steps, d, F(v) * h + F(v) * m / 60)
    while True:
        v = rng.choice([45, 60, 72, 80, 90, 120] if t == 2 else [12, 15, 18, 20])
        minutes = rng.choice(range(20, 181, 10))
        if v * minutes % 60 == 0:
            break
    d = v * minutes // 60
    if t == 2:
        q = f"A train covers {d} km at a constant speed of {v} km per hour. How many minutes does the trip take?"
    else:
        q = (f"{name} rides {her} bike {d} kilometers at {v} kilometers per hour. How long does the ride take, in minutes?")
    x, s1 = calc(d, "×", 60)
    y, s2 = calc(x, "÷", v)
    steps = [f"Time in hours is distance ÷ speed; to get minutes, multiply the distance by 60 first: {s1},",
             f"then divide by the speed: {s2} minutes."]
    return finish(q, steps, y, F(d, v) * 60)


def work_rate(rng):
    t = rng.randrange(3)
    if t < 2:
        r = rng.choice([35, 40, 45, 60, 75, 120, 150])
        h = rng.choice([6, 7, 8, 10, 12])
        days = rng.choice([3, 4, 5, 6])
        if t == 0:
            q = (f"A machine makes {r} bottles per hour. It runs {h} hours a day. How many bottles does it make in {days} days?")
        else:
            q = (f"A printer prints {r} pages an hour, and the office runs it {h} hours each day. "
                 f"How many pages does it print over {days} days?")
        a, s1 = calc(r, "×", h)
        b, s2 = calc(a, "×", days)
        steps = [f"In one day it makes {s1}.", f"Over {days} days that is {s2}."]
        return finish(q, steps, b, r * h * days)
    w = rng.choice([12, 14, 16, 18, 20, 22, 24, 26])
    o = rng.randint(2, 9)
    name, she, her = person(rng)
    q = (f"{name} earns {money(w)} an hour for the first 40 hours of a week and time-and-a-half for every hour "
         f"beyond that. Last week {she} worked {40 + o} hours. How much did {she} earn?")
    a, s1 = calc(40, "×", w)
    ow, s2 = calc(w, "×", F(3, 2))
    b, s3 = calc(o, "×", ow)
    tot, s4 = calc(a, "+", b)
    steps = [f"Regular pay: {s1}.", f"The overtime rate is {s2} dollars an hour, and {her} {o} extra hours pay {s3}.",
             f"Total: {s4} dollars."]
    return finish(q, steps, tot, 40 * w + F(3, 2) * w * o)


def ages(rng):
    t = rng.randrange(3)
    (n1, she1, her1), (n2, _, _) = rng.sample(NAMES, 2)
    if t == 0:
        b = rng.randint(6, 30)
        x = rng.randint(2, 12)
        s = 2 * b + x
        q = (f"{n1} is {x} years older than {n2}. Together their ages add up to {s}. How old is {n2}?")
        y, s1 = calc(s, "-", x)
        z, s2 = calc(y, "÷", 2)
        steps = [f"If we take away the {x}-year difference, the two ages are equal: {s1}.",
                 f"So {n2} is {s2} years old."]
        return finish(q, steps, z, F(s - x, 2))
    if t == 1:
        k = rng.choice([3, 4, 5])
        son = rng.randint(5, 11)
        n = rng.randint(2, 10)
        q = (f"{n1} is {k} times as old as {her1} son. The son is {son} years old. How old will {n1} be in {n} years?")
        a, s1 = calc(k, "×", son)
        b, s2 = calc(a, "+", n)
        steps = [f"{n1} is now {s1} years old.", f"In {n} years {she1} will be {s2}."]
        return finish(q, steps, b, k * son + n)
    y = rng.randint(3, 12)
    d1, d2 = rng.randint(2, 4), rng.randint(2, 5)
    q = (f"There are three siblings. The middle child is {d1} years older than the youngest, and the oldest is "
         f"{d2} years older than the middle child. The youngest is {y}. What is the sum of their ages?")
    m, s1 = calc(y, "+", d1)
    o, s2 = calc(m, "+", d2)
    tot, s3 = calc(y + m, "+", o)
    steps = [f"Middle child: {s1}.", f"Oldest: {s2}.", f"Sum: {y} + {num(m)} = {num(y + m)}, and {s3}."]
    return finish(q, steps, tot, 3 * y + 2 * d1 + d2)


def rectangle(rng):
    t = rng.randrange(3)
    if t == 0:
        width = rng.randint(4, 20)
        length = width + rng.randint(2, 12)
        c = rng.choice([3, 4, F("5.50"), 6, F("7.25"), 12])
        q = (f"A rectangular garden is {length} meters long and {width} meters wide. Fencing costs {money(c)} per "
             f"meter. How much does it cost to fence the whole garden?")
        a, s1 = calc(length, "+", width)
        p, s2 = calc(2, "×", a)
        cost, s3 = calc(p, "×", c)
        steps = [f"The perimeter is 2 × (length + width). {s1}, and {s2} meters.", f"The cost is {s3} dollars."]
        return finish(q, steps, cost, 2 * length * c + 2 * width * c)
    if t == 1:
        width = rng.randint(8, 16)
        length = width + rng.randint(0, 8)
        c = rng.choice([2, 3, F("4.50"), 5])
        q = (f"A room measures {length} feet by {width} feet. Carpet costs {money(c)} per square foot. "
             f"What is the cost to carpet the room?")
        a, s1 = calc(length, "×", width)
        cost, s2 = calc(a, "×", c)
        steps = [f"The floor area is {s1} square feet.", f"The carpet costs {s2} dollars."]
        return finish(q, steps, cost, length * width * c)
    side = rng.randint(3, 25)
    per = 4 * side
    q = rng.choice([f"A square has a perimeter of {per} cm. What is its area in square centimeters?",
                    f"The fence around a square pen is {per} meters long. What is the area of the pen in square meters?"])
    s, s1 = calc(per, "÷", 4)
    a, s2 = calc(s, "×", s)
    steps = [f"A square has four equal sides, so each side is {s1}.", f"The area is side × side = {s2}."]
    return finish(q, steps, a, F(per * per, 16))


def fractions(rng):
    t = rng.randrange(3)
    name, she, her = person(rng)
    if t == 0:
        while True:
            n = rng.choice(range(60, 401, 12))
            a, b = rng.choice([(3, 4), (4, 3), (3, 2), (4, 2), (5, 4), (6, 5), (2, 3)])
            if n % a == 0 and (n - n // a) % b == 0:
                break
        q = (f"{name} is reading a {n}-page book. On Monday {she} reads 1/{a} of the book, and on Tuesday {she} reads "
             f"1/{b} of the pages that were left. How many pages does {she} still have to read?")
        x, s1 = calc(n, "÷", a)
        r, s2 = calc(n, "-", x)
        y, s3 = calc(r, "÷", b)
        left, s4 = calc(r, "-", y)
        steps = [f"Monday: {s1} pages, leaving {s2}.", f"Tuesday: {s3} pages.", f"Pages left: {s4}."]
        return finish(q, steps, left, F(n) * (1 - F(1, a)) * (1 - F(1, b)))
    if t == 1:
        slices = rng.choice([8, 12, 16])
        num_, den = rng.choice([(3, 4), (1, 2), (1, 4), (5, 8), (3, 8)] if slices != 12 else [(2, 3), (3, 4), (1, 3), (5, 6)])
        pizzas = rng.randint(2, 4)
        q = (f"A family orders {pizzas} pizzas, each cut into {slices} slices. They eat {num_}/{den} of all the slices. "
             f"How many slices are left?")
        tot, s1 = calc(pizzas, "×", slices)
        part, s2 = calc(tot, "÷", den)
        if num_ == 1:
            eaten = part
            how = f"One {PART[den]} of them is {s2} slices eaten."
        else:
            eaten, s3 = calc(part, "×", num_)
            how = f"One {PART[den]} of them is {s2}, so {num_}/{den} is {s3} slices eaten."
        left, s4 = calc(tot, "-", eaten)
        steps = [f"There are {s1} slices in total.", how, f"Left: {s4}."]
        return finish(q, steps, left, F(pizzas * slices) * (1 - F(num_, den)))
    num_, den = rng.choice([(2, 3), (3, 4), (3, 5), (2, 5), (5, 6), (4, 7), (3, 8)])
    k = rng.randint(3, 15)
    val = num_ * k
    q = rng.choice([f"{num_}/{den} of a number is {val}. What is the number?",
                    f"After spending {num_}/{den} of {her} allowance, {name} notices that {she} has spent ${val}. "
                    f"How much was the whole allowance, in dollars?"])
    one, s1 = calc(val, "÷", num_)
    whole, s2 = calc(one, "×", den)
    steps = [f"If {num_} parts out of {den} make {val}, one part is {s1}.", f"The whole is {s2}."]
    return finish(q, steps, whole, F(val) / F(num_, den))


def unit_conversion(rng):
    t = rng.randrange(4)
    if t == 0:
        liters = rng.choice([F(1), F("1.5"), F(2), F("2.5"), F(3)])
        g = rng.choice([g for g in (100, 125, 150, 200, 250, 300, 500) if liters * 1000 % g == 0])
        q = f"A jug holds {num(liters)} liter{'s' if liters != 1 else ''} of juice. How many {g} mL glasses can be filled from it?"
        ml, s1 = calc(liters, "×", 1000)
        n, s2 = calc(ml, "÷", g)
        steps = [f"1 liter is 1000 mL, so the jug holds {s1} mL.", f"Number of glasses: {s2}."]
        return finish(q, steps, n, liters * 1000 / g)
    if t == 1:
        m = rng.randint(2, 12)
        c = rng.choice([c for c in (20, 25, 40, 50, 75, 80) if m * 100 % c == 0])
        q = f"A rope {m} meters long is cut into pieces that are each {c} centimeters long. How many pieces are there?"
        cm, s1 = calc(m, "×", 100)
        n, s2 = calc(cm, "÷", c)
        steps = [f"1 meter is 100 cm, so the rope is {s1} cm.", f"Pieces: {s2}."]
        return finish(q, steps, n, F(m * 100, c))
    if t == 2:
        kg = rng.choice([F(1), F("1.5"), F(2), F("2.5"), F(3), F(5)])
        g = rng.choice([g for g in (50, 75, 100, 125, 250) if kg * 1000 % g == 0])
        q = f"A bag holds {num(kg)} kg of rice. Each serving uses {g} grams. How many servings are in the bag?"
        grams, s1 = calc(kg, "×", 1000)
        n, s2 = calc(grams, "÷", g)
        steps = [f"1 kg is 1000 g, so the bag has {s1} grams.", f"Servings: {s2}."]
        return finish(q, steps, n, kg * 1000 / g)
    mins = rng.choice([20, 30, 45, 50, 75, 90])
    days = rng.choice([d for d in (2, 3, 4, 5, 6) if mins * d % 15 == 0])
    name, she, her = person(rng)
    q = (f"{name} practices the piano for {mins} minutes a day, {days} days a week. "
         f"How many hours does {she} practice each week?")
    tot, s1 = calc(mins, "×", days)
    hrs, s2 = calc(tot, "÷", 60)
    steps = [f"Each week {she} practices {s1} minutes.", f"There are 60 minutes in an hour, so that is {s2} hours."]
    return finish(q, steps, hrs, F(mins * days, 60))


def ratio(rng):
    t = rng.randrange(3)
    if t == 0:
        a, b = rng.choice([(2, 3), (3, 5), (1, 4), (4, 5), (3, 7), (5, 3), (2, 5)])
        u = rng.randint(3, 15)
        total = (a + b) * u
        if rng.random() < 0.5:
            q = (f"A bag has red and blue marbles in the ratio {a}:{b}. There are {total} marbles in all. "
                 f"How many are blue?")
            who = "number of blue marbles"
        else:
            q = f"Two friends share ${total} in the ratio {a}:{b}. How many dollars does the second friend get?"
            who = "second friend's share"
        s, s1 = calc(a, "+", b)
        unit, s2 = calc(total, "÷", s)
        part, s3 = calc(b, "×", unit)
        steps = [f"The ratio has {s1} parts.", f"Each part is {s2}.", f"The {who} is {s3}."]
        return finish(q, steps, part, F(total * b, a + b))
    if t == 1:
        cups, cookies = rng.choice([(2, 24), (3, 36), (F("1.5"), 20), (F("2.5"), 30), (4, 48)])
        factor = rng.choice([F(1, 2), F(3, 2), F(2), F(3), F(5, 2)])
        want = cookies * factor
        q = (f"A recipe uses {num(cups)} cups of flour to make {cookies} cookies. How many cups of flour are needed "
             f"for {num(want)} cookies?")
        k, s1 = calc(want, "÷", cookies)
        fl, s2 = calc(cups, "×", k)
        steps = [f"{num(want)} cookies is {s1} times the recipe.", f"Flour needed: {s2} cups."]
        return finish(q, steps, fl, F(cups) * want / cookies)
    a, b = rng.choice([(3, 4), (4, 5), (2, 3), (5, 7), (3, 5)])
    d = (b - a) * rng.randint(3, 9)
    q = (f"In a class the ratio of boys to girls is {a}:{b}, and there are {d} more girls than boys. "
         f"How many students are in the class?")
    diff, s1 = calc(b, "-", a)
    unit, s2 = calc(d, "÷", diff)
    parts, s3 = calc(a, "+", b)
    tot, s4 = calc(parts, "×", unit)
    steps = [f"The girls have {s1} more part{'s' if b - a > 1 else ''} than the boys, and that difference is {d} students, so one part is {s2}.",
             f"The class has {s3} parts, which is {s4} students."]
    return finish(q, steps, tot, F(d, b - a) * (a + b))


def averages(rng):
    t = rng.randrange(2)
    name, she, her = person(rng)
    if t == 0:
        while True:
            scores = [rng.randint(70, 95) for _ in range(3)]
            target = rng.choice([80, 82, 85, 88, 90])
            need = 4 * target - sum(scores)
            if 60 <= need <= 100:
                break
        q = (f"{name} scored {scores[0]}, {scores[1]}, and {scores[2]} on {her} first three tests. What score does {she} "
             f"need on the fourth test to average exactly {target}?")
        tot, s1 = calc(target, "×", 4)
        have = sum(scores)
        n, s2 = calc(tot, "-", have)
        steps = [f"An average of {target} over 4 tests needs a total of {s1} points.",
                 f"So far {she} has {scores[0]} + {scores[1]} + {scores[2]} = {have}.", f"{she.capitalize()} needs {s2}."]
        return finish(q, steps, n, 4 * target - scores[0] - scores[1] - scores[2])
    vals = [rng.randint(8, 30) for _ in range(5)]
    q = (f"The high temperatures for five days were {vals[0]}, {vals[1]}, {vals[2]}, {vals[3]}, and {vals[4]} degrees "
         f"Celsius. What was the average high temperature?")
    s = sum(vals)
    avg, s2 = calc(s, "÷", 5)
    steps = [f"Add them: {' + '.join(map(str, vals))} = {s}.", f"Divide by the number of days: {s2}."]
    return finish(q, steps, avg, F(sum(vals), len(vals)))


def savings(rng):
    t = rng.randrange(2)
    name, she, her = person(rng)
    if t == 0:
        s = rng.choice([5, 8, 10, 12, 15, 20, 25])
        w = rng.randint(4, 16)
        have = rng.choice([10, 15, 20, 30, 45, 60])
        goal = have + s * w
        item = rng.choice(["a bike", "a guitar", "a tablet", "a pair of skates", "a telescope"])
        q = (f"{name} wants to buy {item} that costs {money(goal)}. {she.capitalize()} has already saved {money(have)} "
             f"and puts away {money(s)} every week. How many weeks will it take to have enough?")
        need, s1 = calc(goal, "-", have)
        wk, s2 = calc(need, "÷", s)
        steps = [f"{she.capitalize()} still needs {s1} dollars.", f"At {money(s)} a week that takes {s2} weeks."]
        return finish(q, steps, wk, F(goal - have, s))
    rate = rng.choice([8, 10, 12, 15])
    hours = rng.randint(3, 8)
    weeks = rng.randint(2, 6)
    q = (f"{name} earns {money(rate)} an hour babysitting and babysits {hours} hours each week. How much does {she} earn "
         f"in {weeks} weeks?")
    a, s1 = calc(rate, "×", hours)
    b, s2 = calc(a, "×", weeks)
    steps = [f"Each week {she} earns {s1} dollars.", f"In {weeks} weeks: {s2} dollars."]
    return finish(q, steps, b, rate * hours * weeks)


def interest(rng):
    p = rng.choice([500, 800, 1000, 1200, 1500, 2000, 2500, 4000, 5000])
    r = rng.choice([2, 3, 4, 5, 6, 8])
    years = rng.randint(2, 6)
    total = rng.random() < 0.5
    if total:
        q = (f"A deposit of {money(p)} earns simple interest at {r}% per year. How much is in the account after "
             f"{years} years?")
    else:
        q = f"How much simple interest does a loan of {money(p)} at {r}% a year charge over {years} years?"
    yearly, s1 = calc(p, "×", F(r, 100))
    i, s2 = calc(yearly, "×", years)
    steps = [f"Interest for one year is {r}% of {money(p)}: {s1}.", f"Over {years} years: {s2} dollars."]
    if total:
        a, s3 = calc(p, "+", i)
        steps.append(f"Adding the deposit: {s3}.")
        return finish(q, steps, a, F(p) * (1 + F(r * years, 100)))
    return finish(q, steps, i, F(p * r * years, 100))


def clock(t):
    h, m = divmod(t, 60)
    suffix = "AM" if h < 12 else "PM"
    h12 = h % 12 or 12
    return f"{h12}:{m:02d} {suffix}"


def durations(rng):
    t = rng.randrange(2)
    name, she, her = person(rng)
    if t == 0:
        start = rng.randrange(8 * 60, 20 * 60, 5)
        length = rng.choice([x for x in range(65, 230, 5) if x % 60])
        end = start + length
        q = rng.choice([f"A movie starts at {clock(start)} and ends at {clock(end)}. How many minutes long is it?",
                        f"{name} left home at {clock(start)} and got back at {clock(end)}. For how many minutes was "
                        f"{she} away?"])
        h, m = divmod(length, 60)
        mid = start + h * 60
        whole, s0 = calc(h, "×", 60)
        tot, s1 = calc(whole, "+", m)
        steps = [f"From {clock(start)} to {clock(mid)} is {h} hour{'s' if h != 1 else ''}, which is {s0} minutes,",
                 f"and from {clock(mid)} to {clock(end)} is {m} more minutes.", f"Total: {s1} minutes."]
        return finish(q, steps, tot, end - start)
    bus, walk = rng.randint(12, 40), rng.randint(5, 15)
    days = rng.choice([3, 4, 5])
    q = (f"Each school day {name} walks {walk} minutes to the bus stop and then rides the bus for {bus} minutes, and "
         f"makes the same trip home in the afternoon. How many minutes does {she} spend travelling in {days} school days?")
    one, s1 = calc(walk, "+", bus)
    day, s2 = calc(one, "×", 2)
    tot, s3 = calc(day, "×", days)
    steps = [f"One way takes {s1} minutes.", f"There and back is {s2} minutes a day.", f"For {days} days: {s3}."]
    return finish(q, steps, tot, 2 * days * (walk + bus))


def number_puzzles(rng):
    t = rng.randrange(3)
    if t == 0:
        m = rng.randint(10, 90)
        s = 3 * m
        q = rng.choice([f"The sum of three consecutive integers is {s}. What is the largest of them?",
                        f"Three consecutive whole numbers add up to {s}. Find the biggest one."])
        mid, s1 = calc(s, "÷", 3)
        big, s2 = calc(mid, "+", 1)
        steps = [f"The middle number is the average: {s1}.", f"The largest is {s2}."]
        return finish(q, steps, big, F(s - 3, 3) + 2)
    if t == 1:
        k, a, n = rng.randint(2, 9), rng.randint(3, 30), rng.randint(2, 25)
        r = k * n + a
        name, she, her = person(rng)
        q = (f"{name} thinks of a number, multiplies it by {k}, and then adds {a}. The result is {r}. "
             f"What number did {she} start with?")
        x, s1 = calc(r, "-", a)
        y, s2 = calc(x, "÷", k)
        steps = [f"Undo the steps in reverse order. First subtract {a}: {s1}.", f"Then divide by {k}: {s2}."]
        return finish(q, steps, y, F(r - a, k))
    big, small = rng.randint(20, 80), rng.randint(3, 19)
    s, d = big + small, big - small
    q = f"Two numbers add up to {s} and their difference is {d}. What is the larger number?"
    x, s1 = calc(s, "+", d)
    y, s2 = calc(x, "÷", 2)
    steps = [f"Adding the sum and the difference counts the larger number twice: {s1}.", f"So the larger number is {s2}."]
    return finish(q, steps, y, F(s + d, 2))


def tip_split(rng):
    while True:
        bill = rng.choice(range(40, 241, 2))
        tip = rng.choice([10, 15, 18, 20, 25])
        n = rng.choice([2, 3, 4, 5, 6])
        if bill * (100 + tip) % n == 0:
            break
    q = rng.choice([f"A dinner bill comes to {money(bill)}. The group adds {article(str(tip))} {tip}% tip and splits "
                    f"the total evenly among {n} people. How much does each person pay?",
                    f"{WORDS[n].capitalize()} friends share a restaurant bill of {money(bill)} plus {article(str(tip))} {tip}% tip, paying equal amounts. "
                    f"What is each friend's share in dollars?"])
    t_, s1 = calc(bill, "×", F(tip, 100), money, fb=num)
    tot, s2 = calc(bill, "+", t_, money)
    each, s3 = calc(tot, "÷", n, money, fb=num)
    steps = [f"The tip is {s1}.", f"The total is {s2}.", f"Each person pays {s3}."]
    return finish(q, steps, each, F(bill * (100 + tip), 100 * n))


def volume(rng):
    t = rng.randrange(2)
    if t == 0:
        while True:
            a, b, c = rng.choice([30, 40, 50, 60, 80]), rng.choice([20, 25, 30, 35, 40]), rng.choice([25, 30, 40, 45])
            if a * b * c % 10 == 0:
                break
        q = (f"A fish tank is {a} cm long, {b} cm wide and {c} cm tall. How many liters of water does it hold when full? "
             f"(1 liter = 1000 cubic centimeters)")
        v = a * b * c
        lit, s2 = calc(v, "÷", 1000)
        steps = [f"The volume is {a} × {b} × {c} = {v} cubic centimeters.", f"In liters: {s2}."]
        return finish(q, steps, lit, F(a * b * c, 1000))
    s = rng.choice([2, 3, 5])
    a, b, c = (s * rng.randint(2, 6) for _ in range(3))
    q = f"How many cubes with {s} cm edges fit exactly into a box that is {a} cm by {b} cm by {c} cm?"
    x, s1 = calc(a, "÷", s)
    y, s2 = calc(b, "÷", s)
    z, s3 = calc(c, "÷", s)
    steps = [f"Along each edge: {s1}, {s2}, and {s3} cubes.",
             f"Total: {num(x)} × {num(y)} × {num(z)} = {num(x * y * z)} cubes."]
    return finish(q, steps, x * y * z, F(a * b * c, s ** 3))


GENERATORS = [shopping_change, discount, percent_group, speed_distance, work_rate, ages, rectangle, fractions,
              unit_conversion, ratio, averages, savings, interest, durations, number_puzzles, tip_split, volume]


def build(seed: int = SEED):
    """Return (train, heldout) record lists. Per template type, record 4 (and record 8 for every third type)
    is held out; queries are unique across the whole set."""
    rng = random.Random(seed)
    train, heldout, seen = [], [], set()
    for k, gen in enumerate(GENERATORS):
        for i in range(PER_TYPE):
            for _ in range(1000):
                rec = gen(rng)
                if rec["query"] not in seen:
                    break
            else:
                raise RuntimeError(f"{gen.__name__}: could not draw a new problem")
            seen.add(rec["query"])
            (heldout if i == 4 or (i == 8 and k % 3 == 0) else train).append(rec)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def write(out: Path) -> None:
    train, heldout = build()
    for split, recs in (("train", train), ("heldout", heldout)):
        path = out / split / "math.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "quickstart")
