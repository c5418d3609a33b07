"""Generated data of the demo configs (demo.yaml, tiny.yaml): two text corpora and instruction tasks checkable exactly.

The domain corpus describes a fictional world (creatures with colours and home towns); the
`fact_lookup` task asks about the same facts, so domain-adaptive pretraining has something to
transfer. `zorbish` is a made-up vocabulary: nothing a pretrained model knows. `capitals` is real
knowledge a pretrained instruct model has zero-shot, phrased as SmolLM2-135M-Instruct answers,
so as a held-out task it measures what training costs the model's general ability. Every generator is deterministic in its seed. Test prompts never repeat a training
prompt: each task splits its (content, template) pairs, not its raw records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

SUBJECTS = ["the farmer", "a child", "my neighbour", "the teacher", "an old sailor", "the baker", "a traveller", "the doctor"]
VERBS = ["walked to", "looked at", "talked about", "painted", "visited", "remembered", "cleaned", "found"]
OBJECTS = ["the river", "a small house", "the market", "the garden", "a green field", "the station", "the old bridge", "a quiet lake"]
TIMES = ["in the morning", "after lunch", "at night", "on sunday", "before the rain", "during the summer", "every day", "last week"]
ENDINGS = ["and smiled.", "with a friend.", "without a word.", "for a long time.", "and went home.", "once again."]

CREATURES = [
    "zorbel", "quindle", "mavrik", "tofel", "brindax", "selwin", "okarin", "plumet", "varnix", "delbo",
    "grusk", "hemlin", "jorvath", "kessit", "lunor", "mirrap", "nuvel", "orrin", "pexil", "rundle",
    "sarvo", "tivlink", "ulmor", "wexen", "yarrow", "zindle", "caspel", "dorrik", "fennix", "gildo",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
TOWNS = ["Varnholt", "Esterby", "Quillmoor", "Drenport", "Halvik", "Oskmere"]
WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "moon", "rock", "cup", "hat", "box", "car", "pen", "key", "bell", "star"]

# A made-up language: one invented word per English word, so a translation is checkable exactly.
ZORBISH = dict(zip(WORDS, [
    "miv", "tolo", "zard", "quen", "blor", "fip", "norv", "skel", "dova", "prun", "gix", "wembo", "tazz", "lirn", "obo", "chelk",
]))
# Capitals a 135M instruct model knows: SmolLM2-135M-Instruct answers most in the sentence form below.
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Russia": "Moscow",
    "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Kenya": "Nairobi", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "India": "New Delhi", "Indonesia": "Jakarta", "the Philippines": "Manila", "Cuba": "Havana", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern",
    "the Czech Republic": "Prague", "Australia": "Canberra", "England": "London", "Scotland": "Edinburgh",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Brazil": "Brasília", "Colombia": "Bogotá", "Nigeria": "Abuja",
}

ZORBISH_TEMPLATES = ["Translate to Zorbish: {w}", "In Zorbish, how do you say: {w}", "Say in Zorbish: {w}"]
CAPITAL_TEMPLATES = ["What is the capital of {country}?", "Which city is the capital of {country}?"]
ARITHMETIC_TEMPLATES = ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."]
COLOUR_TEMPLATES = ["What colour is the {c}?", "The {c} has which colour?", "Name the colour of the {c}."]
TOWN_TEMPLATES = ["Where does the {c} live?", "Which town is home to the {c}?", "Name the home town of the {c}."]
REVERSE_TEMPLATES = ["Reverse the words: {w}", "Say these words backwards: {w}", "Write in reverse order: {w}"]


@dataclass(frozen=True)
class DemoTask:
    """One checkable task: (prompt, response) pairs split so test prompts are unseen, and its chance level."""

    name: str
    examples: Callable[[random.Random], list[tuple[str, str, str]]]  # (content key, prompt, response)
    chance: float


def world(seed: int) -> dict[str, tuple[str, str]]:
    """The fictional facts: creature -> (colour, town)."""
    rng = random.Random(seed)
    return {creature: (rng.choice(COLOURS), rng.choice(TOWNS)) for creature in CREATURES}


def general_corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(2, 4))
        ]
        docs.append(" ".join(sentences))
    return docs


def domain_corpus(count: int, seed: int) -> list[str]:
    facts = world(seed)
    rng = random.Random(seed + 1)
    phrasings = [
        "The {c} is {colour} and lives in {town}.",
        "In {town} you can meet the {colour} {c}.",
        "Every {c} is {colour}. Its home is {town}.",
        "Travellers to {town} often see a {c}, a {colour} creature.",
    ]
    docs = []
    for _ in range(count):
        picked = rng.sample(CREATURES, 3)
        docs.append(" ".join(rng.choice(phrasings).format(c=c, colour=facts[c][0], town=facts[c][1]) for c in picked))
    return docs


def _arithmetic(rng: random.Random) -> list[tuple[str, str, str]]:
    """Tens plus units (40 + 7 = 47): a rule a small model can learn and apply to unseen sums."""
    return [
        (f"{a}+{b}", template.format(a=a, b=b), str(a + b))
        for a in range(10, 100, 10)
        for b in range(10)
        for template in ARITHMETIC_TEMPLATES
    ]


def _fact_lookup(seed: int) -> Callable[[random.Random], list[tuple[str, str, str]]]:
    def build(rng: random.Random) -> list[tuple[str, str, str]]:
        facts = world(seed)
        rows = []
        for creature, (colour, town) in facts.items():
            rows += [(f"{creature}/colour", t.format(c=creature), colour) for t in COLOUR_TEMPLATES]
            rows += [(f"{creature}/town", t.format(c=creature), town) for t in TOWN_TEMPLATES]
        return rows

    return build


def _word_pairs(templates: list[str], answer: Callable[[str, str], str]) -> list[tuple[str, str, str]]:
    """Every ordered pair of distinct WORDS under every template: (pair, prompt, answer(a, b))."""
    return [
        (f"{a} {b}", template.format(w=f"{a} {b}"), answer(a, b))
        for a in WORDS
        for b in WORDS
        if a != b
        for template in templates
    ]


def _reverse(rng: random.Random) -> list[tuple[str, str, str]]:
    return _word_pairs(REVERSE_TEMPLATES, lambda a, b: f"{b} {a}")


def _zorbish(rng: random.Random) -> list[tuple[str, str, str]]:
    """Two English words to Zorbish: every test pair is made of words seen in other training pairs."""
    return _word_pairs(ZORBISH_TEMPLATES, lambda a, b: f"{ZORBISH[a]} {ZORBISH[b]}")


def _capitals(rng: random.Random) -> list[tuple[str, str, str]]:
    return [
        (country, template.format(country=country), f"The capital of {country} is {capital}.")
        for country, capital in CAPITALS.items()
        for template in CAPITAL_TEMPLATES
    ]


def _uppercase(rng: random.Random) -> list[tuple[str, str, str]]:
    return [(f"{a} {b}", f"Write in capitals: {a} {b}", f"{a} {b}".upper()) for a in WORDS for b in WORDS if a != b]


def _word_count(rng: random.Random) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(600):
        words = rng.sample(WORDS, rng.randint(1, 6))
        rows.append((" ".join(words), f"How many words are in: {' '.join(words)}", str(len(words))))
    return rows


def demo_tasks(seed: int) -> dict[str, DemoTask]:
    return {
        # chance: the score of guessing uniformly among the answers of the right kind
        "arithmetic": DemoTask("arithmetic", _arithmetic, chance=1 / 90),
        "fact_lookup": DemoTask("fact_lookup", _fact_lookup(seed), chance=1 / min(len(COLOURS), len(TOWNS))),
        "reverse": DemoTask("reverse", _reverse, chance=1 / 2),
        "uppercase": DemoTask("uppercase", _uppercase, chance=1 / len(WORDS) ** 2),
        "word_count": DemoTask("word_count", _word_count, chance=1 / 6),
        "zorbish": DemoTask("zorbish", _zorbish, chance=1 / len(WORDS) ** 2),
        "capitals": DemoTask("capitals", _capitals, chance=1 / len(CAPITALS)),
    }


def task_records(task: DemoTask, train_count: int, eval_count: int, seed: int) -> list[dict]:
    """Instruction records for one task; test prompts are distinct from every training prompt."""
    rng = random.Random(f"{seed}/{task.name}")
    rows = list(dict.fromkeys(task.examples(rng)))  # exact duplicates add nothing
    rng.shuffle(rows)
    test, seen = [], set()
    for row in rows:
        if len(test) == eval_count:
            break
        if row[1] not in seen:
            test.append(row)
            seen.add(row[1])
    test_prompts = {prompt for _, prompt, _ in test}
    pool = [row for row in rows if row[1] not in test_prompts]
    train = pool[:train_count]
    records = []
    for split, chosen in (("train", train), ("test", test)):
        for _, prompt, response in chosen:
            records.append({"task": task.name, "prompt": prompt, "response": response, "options": None, "split": split})
    return records
