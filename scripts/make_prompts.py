"""Write lmdistill/assets/prompts.jsonl: the bundled prompt set the quickstart distills on.

Short instructions and questions of the kind a 135M instruct teacher handles: facts, definitions,
short explanations, simple arithmetic. Each record has a stable `id`, a `prompt`, a `category`, and a
`split` ("train" or "test", by a hash of the prompt, about 75/25; the arithmetic questions keep their
task's split), so held-out prompts never leak into training. A second file, prompts_extra_test.jsonl, holds
held-out prompts only (the same templates about other subjects) for bench/methods.py. Regenerate with: .venv/bin/python scripts/make_prompts.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

COUNTRIES = [
    "France",
    "Japan",
    "Italy",
    "Spain",
    "Germany",
    "Canada",
    "Australia",
    "Brazil",
    "Egypt",
    "India",
    "China",
    "Russia",
    "Mexico",
    "Argentina",
    "Kenya",
    "Norway",
    "Sweden",
    "Greece",
    "Portugal",
    "Ireland",
    "Poland",
    "Turkey",
    "Thailand",
    "Vietnam",
    "Peru",
    "Chile",
    "Cuba",
    "Austria",
    "Belgium",
    "Netherlands",
    "Denmark",
    "Finland",
    "Hungary",
    "Morocco",
    "Nigeria",
    "South Korea",
    "Indonesia",
    "Colombia",
    "Switzerland",
    "New Zealand",
]
WORDS = [
    "democracy",
    "gravity",
    "friendship",
    "ocean",
    "volcano",
    "library",
    "algorithm",
    "planet",
    "energy",
    "habitat",
    "climate",
    "history",
    "music",
    "poetry",
    "economy",
    "vaccine",
    "bridge",
    "island",
    "desert",
    "forest",
    "language",
    "mountain",
    "river",
    "computer",
    "science",
    "kindness",
    "courage",
    "recipe",
    "orbit",
    "molecule",
    "galaxy",
    "fossil",
    "harvest",
    "journey",
    "museum",
    "telescope",
    "umbrella",
    "tradition",
    "festival",
    "glacier",
    "metaphor",
    "pyramid",
    "satellite",
    "passport",
    "battery",
    "keyboard",
    "garden",
    "holiday",
    "weather",
    "password",
]
CONCEPTS = [
    "photosynthesis",
    "the water cycle",
    "why the sky is blue",
    "how a rainbow forms",
    "what a cell is",
    "how vaccines work",
    "why we have seasons",
    "what inflation is",
    "how a compass works",
    "what DNA is",
    "how the heart pumps blood",
    "what electricity is",
    "why leaves change color in autumn",
    "how airplanes fly",
    "what a black hole is",
    "how the internet works",
    "what recycling is",
    "why the moon has phases",
    "what an atom is",
    "how bees make honey",
    "what a volcano eruption is",
    "how a battery stores energy",
    "what machine learning is",
    "why exercise is healthy",
    "how sound travels",
    "what gravity does",
    "how plants grow from seeds",
    "what a democracy is",
    "why we need sleep",
    "how clouds form",
    "what a computer program is",
    "what evaporation is",
    "how fish breathe underwater",
    "why ice floats",
    "what the greenhouse effect is",
    "how magnets work",
    "what a calendar is for",
    "why the ocean is salty",
    "how a thermometer works",
    "what friction is",
    "how birds migrate",
    "what a map scale is",
    "how money is used",
    "what a noun is",
    "what a verb is",
    "how to measure temperature",
    "what the sun is made of",
    "why we brush our teeth",
    "how trees help the environment",
    "what a telescope does",
]
FACT_QUESTIONS = [
    "How many legs does a spider have?",
    "How many days are in a week?",
    "How many months are in a year?",
    "What color is the sky on a clear day?",
    "What do bees make?",
    "What is the largest planet in our solar system?",
    "What is the boiling point of water in Celsius?",
    "How many continents are there?",
    "What gas do plants take in from the air?",
    "What is the freezing point of water in Celsius?",
    "Which animal is known as the king of the jungle?",
    "What is the opposite of hot?",
    "What is the largest ocean on Earth?",
    "How many hours are in a day?",
    "What is the closest star to Earth?",
    "What do caterpillars turn into?",
    "Name a fruit that is yellow.",
    "Name a primary color.",
    "Name an animal that can fly.",
    "What is the chemical symbol for water?",
    "How many sides does a triangle have?",
    "How many sides does a square have?",
    "What is the main language spoken in Brazil?",
    "Which planet is known as the Red Planet?",
    "What do you call a baby cat?",
    "What do you call a baby dog?",
    "What is frozen water called?",
    "Which season comes after winter?",
    "What is the tallest animal in the world?",
    "How many minutes are in an hour?",
    "What instrument has black and white keys?",
    "What shape has no corners?",
    "Which organ do we use to breathe?",
    "What is the capital letter of the word apple?",
    "What is the first letter of the alphabet?",
    "How many wheels does a bicycle have?",
    "What do cows drink?",
    "What is the color of grass?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "What is the largest mammal?",
]
TASKS = [
    "Write one sentence about the ocean.",
    "Give two tips for staying healthy.",
    "Suggest a name for a pet goldfish.",
    "Write a short greeting for a birthday card.",
    "List three fruits.",
    "List three colors.",
    "List three animals that live in the sea.",
    "Give one reason to read books.",
    "Write a one-line motto for a library.",
    "Describe a sunny day in one sentence.",
    "Give two tips for studying.",
    "Write a polite way to ask for help.",
    "Suggest a healthy breakfast.",
    "List three things you can do on a rainy day.",
    "Write a short thank-you note to a teacher.",
    "Give two tips for saving water.",
    "Describe a cat in one sentence.",
    "Write one sentence about the moon.",
    "Suggest a title for a story about a dragon.",
    "Give one tip for a good night's sleep.",
    "List three vegetables.",
    "Write a short sentence about friendship.",
    "Give two ideas for a weekend activity.",
    "Describe the taste of lemon in a few words.",
    "List three musical instruments.",
    "Write a one-sentence summary of what a chef does.",
    "Give two tips for learning a language.",
    "Name three planets.",
    "Write one sentence about trees.",
    "List three kinds of weather.",
]


# Held-out only (scripts/make_prompts.py writes them to prompts_extra_test.jsonl): the same
# templates about subjects the bundled set never names, so a method comparison
# (bench/methods.py) can score 200+ held-out prompts; the quickstart never reads them.
EXTRA_COUNTRIES = [
    "Iceland",
    "Jamaica",
    "Nepal",
    "Pakistan",
    "Philippines",
    "Malaysia",
    "Ukraine",
    "Romania",
    "Bulgaria",
    "Croatia",
    "Serbia",
    "Czech Republic",
    "Slovakia",
    "Estonia",
    "Latvia",
    "Lithuania",
    "Ghana",
    "Ethiopia",
    "Tanzania",
    "Uganda",
    "Senegal",
    "Algeria",
    "Tunisia",
    "Saudi Arabia",
    "Iran",
    "Iraq",
    "Israel",
    "Jordan",
    "Lebanon",
    "Qatar",
    "Bangladesh",
    "Sri Lanka",
    "Mongolia",
    "Uruguay",
    "Paraguay",
    "Bolivia",
    "Ecuador",
    "Venezuela",
    "Panama",
    "Costa Rica",
]
EXTRA_WORDS = [
    "justice",
    "curiosity",
    "patience",
    "honesty",
    "ecosystem",
    "microscope",
    "compass",
    "lighthouse",
    "orchestra",
    "newspaper",
    "calendar",
    "earthquake",
    "hurricane",
    "canyon",
    "peninsula",
    "continent",
    "vitamin",
    "bacteria",
    "migration",
    "architecture",
    "sculpture",
    "symphony",
    "alphabet",
    "dictionary",
    "engine",
    "factory",
    "currency",
    "election",
    "neighbor",
    "invention",
]
EXTRA_CONCEPTS = [
    "how tides work",
    "what erosion is",
    "how a refrigerator keeps food cold",
    "why ice floats on water",
    "what a food chain is",
    "how fish breathe underwater",
    "what a solar eclipse is",
    "how a thermometer works",
    "why salt melts ice",
    "what evaporation is",
    "how a magnet works",
    "what a habitat is",
    "how birds migrate",
    "what a fossil tells us",
    "why we sweat",
    "how a lever works",
    "what friction is",
    "how the eye sees color",
    "what an earthquake is",
    "how wind is made",
    "what a budget is",
    "how a bicycle stays upright",
    "what a virus is",
    "how soap cleans",
    "why bread rises",
    "what a map scale is",
    "how a telescope works",
    "what a rain forest is",
    "how paper is made",
    "why stars twinkle",
]
EXTRA_FACT_QUESTIONS = [
    "How many days are in a leap year?",
    "What is the smallest planet in our solar system?",
    "How many legs does an insect have?",
    "What do you call a baby sheep?",
    "What do you call a baby cow?",
    "Which planet has the most famous rings?",
    "How many sides does a hexagon have?",
    "What is the hardest natural substance?",
    "What is the largest desert in the world?",
    "How many seconds are in a minute?",
    "Which bird is a symbol of peace?",
    "What is the longest river in Africa?",
    "What do pandas mainly eat?",
    "How many strings does a standard guitar have?",
    "What color are ripe bananas?",
    "What is the opposite of up?",
    "Which season comes after summer?",
    "What is the capital letter of the word zebra?",
    "How many wheels does a tricycle have?",
    "What do plants need to make food from sunlight?",
]
EXTRA_TASKS = [
    "Write one sentence about the sun.",
    "Give two tips for staying calm.",
    "Suggest a name for a pet rabbit.",
    "Write a short greeting for a wedding card.",
    "List three kinds of trees.",
    "List three sports.",
    "Give one reason to learn to cook.",
    "Write a one-line motto for a bakery.",
    "Describe a snowy day in one sentence.",
    "Give two tips for keeping a room tidy.",
    "Write a polite way to decline an invitation.",
    "Suggest a healthy snack.",
    "List three things you can do at the beach.",
    "Write a short thank-you note to a friend.",
    "Give two tips for saving energy at home.",
    "Describe a dog in one sentence.",
    "Write one sentence about mountains.",
    "Suggest a title for a story about a robot.",
    "List three kinds of birds.",
    "Give two ideas for a rainy afternoon.",
]


def arithmetic(
    counts: tuple[tuple[str, int, int], ...] = (("train", 0, 94), ("test", 0, 36)),
) -> list[tuple[str, str]]:
    """(prompt, split): the quickstart's verifiable task's own questions (reasoning-gym
    arithmetic_1digit, asked with its instruction), so what the student is trained on is what it
    is tested on: 94 from the task's train split, 36 from its test split (the two splits never
    share a question). Measured when this was chosen: with 'What is a + b?' prompts instead, the
    students scored 0 to 2.5% on the task; with these, 6.2% (KD) and 7.5% (SFT-only) in the
    README's run of 2026-11-28 (teacher 65%)."""
    from lmdistill.tasks import get_task

    task = get_task("arithmetic_1digit")
    return [
        (example.messages[-1]["content"], split)
        for split, start, stop in counts
        for example in task.examples(split=split, limit=stop, seed=0)[start:]
    ]


def write(out: Path, groups: dict[str, list], seen: set[str], *, all_test: bool) -> dict[str, int]:
    """One JSONL record per new prompt (duplicates of `seen` skipped); the split is the hash's
    (about 75/25), an item's own, or "test" for every prompt when `all_test`."""
    counts = {"train": 0, "test": 0}
    with out.open("w") as f:
        for category, prompts in groups.items():
            for item in prompts:
                prompt, fixed = item if isinstance(item, tuple) else (item, None)
                if prompt in seen:
                    continue
                seen.add(prompt)
                digest = hashlib.sha256(prompt.encode()).hexdigest()
                by_hash = "test" if int(digest[:8], 16) % 4 == 0 else "train"
                split = "test" if all_test else (fixed or by_hash)
                counts[split] += 1
                record = {"id": digest[:12], "prompt": prompt, "category": category, "split": split}
                f.write(json.dumps(record) + "\n")
    print(f"wrote {out}: {counts}")
    return counts


def templated(countries, words, concepts, facts, tasks) -> dict[str, list[str]]:
    """The bundled templates, by category, over these subjects."""
    return {
        "capital": [f"What is the capital of {c}?" for c in countries],
        "definition": [f"Define the word '{w}' in one sentence." for w in words],
        "explanation": [f"Explain {c} in one or two sentences." for c in concepts],
        "fact": facts,
        "instruction": tasks,
    }


def main() -> None:
    assets = Path(__file__).resolve().parents[1] / "lmdistill" / "assets"
    seen: set[str] = set()
    bundled = {
        **templated(COUNTRIES, WORDS, CONCEPTS, FACT_QUESTIONS, TASKS),
        "arithmetic": arithmetic(),
    }
    write(assets / "prompts.jsonl", bundled, seen, all_test=False)
    extra = {
        **templated(
            EXTRA_COUNTRIES, EXTRA_WORDS, EXTRA_CONCEPTS, EXTRA_FACT_QUESTIONS, EXTRA_TASKS
        ),
        # The next 40 questions of the task's test split (the bundled set has its first 36).
        "arithmetic": arithmetic((("test", 36, 76),)),
    }
    write(assets / "prompts_extra_test.jsonl", extra, seen, all_test=True)


if __name__ == "__main__":
    main()
