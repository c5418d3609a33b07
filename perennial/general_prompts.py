"""The general instruction prompts Perennial ships for self-synthesized rehearsal (`cit.ssr.prompts`).

- `builtin`: everyday requests of many kinds (explain, define, list, advise, describe, write, count), so
  the model's own answers to them carry its general behaviour and answer format.
- `facts`: short questions about real-world facts (science, language, history, geography), which an
  instruct model answers in a sentence. Narrow tasks with one-word answers about a made-up world (the
  demo's `fact_lookup`: "Which town is home to the zorbel?") teach the model to answer *every* short
  question with one of their words; rehearsing its own answers to real ones keeps both its knowledge
  in use and its answer format (README, "What make run does").
- `places`: where real things are ("Which city is home to the Golden Gate Bridge?", "Where is Mount
  Fuji?"). A task that answers "Which town is home to the zorbel?" with a made-up town teaches the
  model to answer real where-questions with that town too; rehearsing its own answers to real ones
  keeps the two apart. Combine pools with a list: `cit.ssr.prompts: [facts, places]`.

No prompt of any pool asks for a capital, and none names a country or capital of the demo's held-out
task (`capitals`), so it stays held out (tests/test_ssr.py checks); `builtin` and `facts` name no city
either. Users point `cit.ssr.prompts` at their own pool (a .txt file, one prompt a line, or a .jsonl
file with a `prompt` field).
"""

from __future__ import annotations

import json
from pathlib import Path

from perennial.config import ConfigError

BUILTIN = (
    "Tell me about the moon.",
    "What is photosynthesis?",
    "Explain why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What does a thermometer measure?",
    "Describe a rainy day in one sentence.",
    "How many days are there in a week?",
    "What is the largest planet in the solar system?",
    "Write a short greeting for a birthday card.",
    "What is the difference between weather and climate?",
    "Name three colours of the rainbow.",
    "Why do we need to drink water?",
    "What is a noun?",
    "Explain what a computer program is.",
    "Suggest a healthy breakfast.",
    "What do bees make?",
    "How does a bicycle work?",
    "What is the boiling point of water in Celsius?",
    "Write one sentence about a friendly dog.",
    "What are the four seasons?",
    "Why do leaves change colour in autumn?",
    "What is gravity?",
    "Give an example of a mammal that lives in the ocean.",
    "How do you make a cup of tea?",
    "What is the opposite of hot?",
    "Describe the taste of a lemon.",
    "What is a volcano?",
    "How many legs does a spider have?",
    "What is the main ingredient of bread?",
    "Explain what recycling is.",
    "What does a doctor do?",
    "Write a polite way to say no to an invitation.",
    "What is the sun made of?",
    "Why is exercise good for you?",
    "What is a verb?",
    "Name a musical instrument with strings.",
    "How do plants drink water?",
    "What is the speed of light, roughly?",
    "Describe the ocean in a few words.",
    "What is an insect?",
    "How can I save energy at home?",
    "What is a triangle?",
    "Explain what a library is.",
    "What do cows eat?",
    "Write a short thank-you note to a teacher.",
    "What is ice?",
    "Why do we have day and night?",
    "What is the purpose of a map?",
    "Give me a fun fact about elephants.",
    "What is electricity?",
    "How many minutes are in an hour?",
    "What is a good way to learn a new language?",
    "Describe a forest.",
    "What is a rainbow?",
    "Why do birds migrate?",
    "What is the tallest animal?",
    "Explain what a calendar is for.",
    "What are clouds made of?",
    "Suggest a name for a pet cat.",
    "What is friendship?",
    "How do you stay safe crossing a street?",
    "What is a desert?",
    "What does a chef do?",
    "Tell me a short story about a brave mouse.",
)

FACTS = (
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the freezing point of water in Celsius?",
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "How many strings does a standard guitar have?",
    "What is the boiling point of water in Fahrenheit?",
    "What is the longest river in Africa?",
    "How many legs does an insect have?",
    "What gas do plants take in from the air?",
    "Who was the first person to walk on the moon?",
    "What is the hardest natural substance?",
    "Which animal is known as the king of the jungle?",
    "What is the largest mammal?",
    "How many sides does a hexagon have?",
    "What is the largest organ of the human body?",
    "Which instrument has black and white keys?",
    "What is the closest star to Earth?",
    "Who discovered penicillin?",
    "What is H2O commonly called?",
    "How many bones are in the adult human body?",
    "What is the largest desert in the world?",
    "How many hours are in a day?",
    "What colour do you get by mixing blue and yellow?",
    "Which bird is a symbol of peace?",
    "What is the tallest mountain in the world?",
    "Who invented the telephone?",
    "What is the square root of 81?",
    "Which organ pumps blood through the body?",
    "What is the smallest prime number?",
    "What is the main gas in the air we breathe?",
    "What do bees collect from flowers?",
    "Which metal is liquid at room temperature?",
    "Who wrote the novel Pride and Prejudice?",
    "How many players are on a football team?",
    "What is the opposite of north?",
    "Which season comes after winter?",
    "Who wrote the play Hamlet?",
    "How many teeth does an adult human have?",
    "Which planet has rings around it?",
    "Which planet is closest to the sun?",
    "How many days are in a leap year?",
    "Which animal is the fastest on land?",
    "Which sea is the saltiest?",
    "What is the primary colour of grass?",
    "Who developed the theory of relativity?",
)

# Kept: the questions SmolLM2-135M-Instruct answers with a real place. Left out after reading its answers: ones it
# calls a "fictional city" (the Big Apple, the Windy City), since rehearsing those would teach the opposite.
PLACES = (
    "Which city is home to the Statue of Liberty?",
    "Which city is home to the Golden Gate Bridge?",
    "Which city is famous for its canals and gondolas?",
    "Which city is home to the Space Needle?",
    "Which city is home to the Liberty Bell?",
    "Which city is home to the Taj Mahal?",
    "Which city is home to the Christ the Redeemer statue?",
    "Which city is home to the Leaning Tower of Pisa?",
    "In which city are the Hollywood studios?",
    "In which city was the Titanic built?",
    "Where is the Grand Canyon?",
    "Where is Mount Kilimanjaro?",
    "Where is the Great Barrier Reef?",
    "Where is the Amazon rainforest?",
    "Where is the Sahara Desert?",
    "Where is Mount Fuji?",
    "Where is the Dead Sea?",
    "Where is Niagara Falls?",
    "Where is Silicon Valley?",
    "Where is Yellowstone National Park?",
    "Where is the Panama Canal?",
    "Where is the Mississippi River?",
    "Where do penguins live?",
    "Where do polar bears live?",
    "Where do kangaroos live?",
)

POOLS = {"builtin": BUILTIN, "facts": FACTS, "places": PLACES}  # the names `cit.ssr.prompts` accepts besides a file


def load_prompts(spec: str | list[str]) -> list[str]:
    """The prompt pool `cit.ssr.prompts` names: a shipped pool (`POOLS`: builtin, facts, places), a .txt file (one
    prompt a line), a .jsonl file (a `prompt` field per line), or a list of those, joined in order without repeats.
    Raises ConfigError naming the file and what it must hold."""
    if isinstance(spec, list):
        return list(dict.fromkeys(prompt for part in spec for prompt in load_prompts(part)))
    if spec in POOLS:
        return list(POOLS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"cit.ssr.prompts: {spec} is not a file; use {', '.join(POOLS)}, a .txt file (one prompt a "
                          "line) or a .jsonl file")
    if path.suffix == ".jsonl":
        try:
            prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cit.ssr.prompts: {spec} must hold one JSON object with a `prompt` string a line ({error})") from None
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ConfigError(f"cit.ssr.prompts: {spec} holds no prompt")
    return prompts
