"""Instruction-following rows of the large general suite, in IFEval's own row format.

Each row is a short task ("Write a short sentence about the ocean.") plus one or two verifiable
instructions, written as ``instruction_id_list`` + ``kwargs`` exactly as IFEval's
``input_data.jsonl`` writes them, so lm-evaluation-harness's checkers verify the answers
(``eval/ifeval.py``).  Only instructions whose checkers need no downloaded data, and that a
135M chat model can follow some of the time, are used; the two-instruction rows pair
instructions that one answer can satisfy together.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# (topic, two words a fitting answer may use, two words an answer about it is tempted to use,
# the topic's own noun)
INSTRUCTION_TOPICS = [
    ("the ocean", ["water", "blue"], ["sea", "waves"], "ocean"),
    ("the moon", ["night", "sky"], ["bright", "light"], "moon"),
    ("coffee", ["morning", "cup"], ["hot", "drink"], "coffee"),
    ("dogs", ["loyal", "friend"], ["pet", "pets"], "dog"),
    ("rain", ["clouds", "wet"], ["water", "umbrella"], "rain"),
    ("music", ["song", "happy"], ["sound", "songs"], "music"),
    ("trees", ["leaves", "green"], ["forest", "wood"], "tree"),
    ("winter", ["snow", "cold"], ["ice", "warm"], "winter"),
    ("bicycles", ["wheels", "ride"], ["bike", "pedal"], "bicycle"),
    ("bread", ["flour", "bake"], ["wheat", "oven"], "bread"),
    ("the sun", ["light", "warm"], ["hot", "star"], "sun"),
    ("friendship", ["trust", "together"], ["friend", "friends"], "friendship"),
    ("books", ["read", "story"], ["reading", "pages"], "book"),
    ("cats", ["soft", "play"], ["pet", "cute"], "cat"),
    ("mountains", ["high", "climb"], ["snow", "peak"], "mountain"),
    ("gardens", ["flowers", "grow"], ["plants", "green"], "garden"),
    ("trains", ["travel", "fast"], ["track", "station"], "train"),
    ("birds", ["fly", "sing"], ["wings", "nest"], "bird"),
    ("apples", ["red", "sweet"], ["fruit", "tree"], "apple"),
    ("the city", ["busy", "people"], ["buildings", "streets"], "city"),
]

BASE_TASKS = [
    "Write a short sentence about {topic}.", "Describe {topic} in a few words.",
    "Give me one short fact about {topic}.", "Write a short note about {topic}.",
    "Tell me one reason to like {topic}.",
]

YES_NO_QUESTIONS = [
    "Is the sun a star?", "Can penguins fly?", "Is water made of hydrogen and oxygen?", "Do fish live in water?",
    "Is the Moon bigger than the Earth?", "Do plants need sunlight to grow?", "Is ice colder than boiling water?",
    "Can a cat bark?", "Is Paris in France?", "Are whales mammals?", "Is seven an even number?",
    "Do spiders have eight legs?", "Is the Pacific the largest ocean?", "Can humans breathe underwater without help?",
    "Is a tomato a fruit?", "Does the Earth orbit the Sun?", "Is chocolate made from cocoa?",
    "Are there twelve months in a year?", "Is snow hot?", "Do bees make honey?",
]

END_PHRASES = ["Is there anything else I can help with?", "Have a nice day.", "That is all.",
               "Thank you for reading.", "Let me know if you have questions.", "The end."]
REPEAT_REQUEST = ("First repeat the request below word for word without change, then give your answer "
                  "(do not say anything before repeating the request; the request you need to repeat "
                  "does not include this sentence).")
SHORT_BUDGET, LONG_BUDGET = 64, 96  # new tokens: one sentence vs a list / JSON / sections


@dataclass(frozen=True)
class InstructionSpec:
    """One IFEval instruction: its id, the sentence that asks for it, and how its kwargs are drawn."""

    instruction_id: str
    text: Callable[[dict], str]  # kwargs -> the instruction as written in the prompt
    draw: Callable[[random.Random, tuple], dict]  # (rng, topic row) -> kwargs
    budget: int = SHORT_BUDGET


def _none(rng: random.Random, topic: tuple) -> dict:
    return {}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


SPECS = {s.instruction_id: s for s in [
    InstructionSpec("change_case:english_lowercase", lambda k: "Your entire response should be in English, and in "
                    "all lowercase letters. No capital letters are allowed.", _none),
    InstructionSpec("change_case:english_capital", lambda k: "Your entire response should be in English, and in "
                    "all capital letters.", _none),
    InstructionSpec("length_constraints:number_words", lambda k: f"Answer with less than {k['num_words']} words.",
                    lambda rng, t: {"relation": "less than", "num_words": rng.choice([10, 12, 15, 20, 25, 30])}),
    InstructionSpec("keywords:existence", lambda k: f"Include the keywords {k['keywords'][0]} and "
                    f"{k['keywords'][1]} in the response.", lambda rng, t: {"keywords": list(t[1])}),
    InstructionSpec("startend:end_checker", lambda k: f"Finish your response with this exact phrase: "
                    f"{k['end_phrase']} No other words should follow this phrase.",
                    lambda rng, t: {"end_phrase": rng.choice(END_PHRASES)}),
    InstructionSpec("startend:quotation", lambda k: "Wrap your entire response with double quotation marks.", _none),
    InstructionSpec("detectable_format:json_format", lambda k: "Your entire output should be wrapped in JSON "
                    "format. You can use markdown ticks such as ```.", _none, LONG_BUDGET),
    InstructionSpec("detectable_format:number_bullet_lists", lambda k: f"Your answer must contain exactly "
                    f"{k['num_bullets']} bullet points. Use the markdown bullet points such as:\n* This is point 1.",
                    lambda rng, t: {"num_bullets": rng.choice([2, 3])}, LONG_BUDGET),
    InstructionSpec("punctuation:no_comma", lambda k: "In your entire response, refrain from the use of any commas.",
                    _none),
    InstructionSpec("detectable_content:postscript", lambda k: f"At the end of your response, please explicitly "
                    f"add a postscript starting with {k['postscript_marker']}",
                    lambda rng, t: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}),
    InstructionSpec("detectable_format:title", lambda k: "Your answer must contain a title, wrapped in double "
                    "angular brackets, such as <<poem of joy>>.", _none),
    InstructionSpec("keywords:forbidden_words", lambda k: f"Do not include the words {k['forbidden_words'][0]} "
                    f"or {k['forbidden_words'][1]} in the response.", lambda rng, t: {"forbidden_words": list(t[2])}),
    InstructionSpec("detectable_content:number_placeholders", lambda k: f"The response must contain at least "
                    f"{_plural(k['num_placeholders'], 'placeholder')} represented by square brackets, such as "
                    f"[address].", lambda rng, t: {"num_placeholders": rng.choice([1, 2])}),
    InstructionSpec("combination:repeat_prompt", lambda k: REPEAT_REQUEST, _none, LONG_BUDGET),
    InstructionSpec("detectable_format:constrained_response", lambda k: "Answer with one of the following options: "
                    "('My answer is yes.', 'My answer is no.', 'My answer is maybe.')", _none),
    InstructionSpec("detectable_format:number_highlighted_sections", lambda k: f"Highlight at least "
                    f"{_plural(k['num_highlights'], 'section')} in your answer with markdown, i.e. "
                    f"*highlighted section*.", lambda rng, t: {"num_highlights": rng.choice([1, 2])}),
    InstructionSpec("keywords:frequency", lambda k: f"In your response, the word {k['keyword']} should appear at "
                    f"least {k['frequency']} times.",
                    lambda rng, t: {"keyword": t[3], "frequency": rng.choice([2, 3]), "relation": "at least"}),
    InstructionSpec("combination:two_responses", lambda k: "Give two different responses. Responses and only "
                    "responses should be separated by 6 asterisk symbols: ******.", _none, LONG_BUDGET),
    InstructionSpec("detectable_format:multiple_sections", lambda k: f"Your response must have "
                    f"{k['num_sections']} sections. Mark the beginning of each section with {k['section_spliter']} "
                    f"X, such as:\n{k['section_spliter']} 1\n[content of section 1]\n{k['section_spliter']} 2\n"
                    f"[content of section 2]", lambda rng, t: {"section_spliter": "SECTION", "num_sections": 2},
                    LONG_BUDGET),
    InstructionSpec("length_constraints:number_paragraphs", lambda k: f"There should be {k['num_paragraphs']} "
                    f"paragraphs. Paragraphs are separated with the markdown divider: ***",
                    lambda rng, t: {"num_paragraphs": 2}, LONG_BUDGET),
]}

# How many single-instruction rows each instruction gets, and the pairs one answer can satisfy
# together (two rows each).
SINGLE_COUNTS = {
    "change_case:english_lowercase": 12, "change_case:english_capital": 12, "length_constraints:number_words": 12,
    "keywords:existence": 12, "startend:end_checker": 12, "startend:quotation": 10,
    "detectable_format:json_format": 10, "detectable_format:number_bullet_lists": 10, "punctuation:no_comma": 10,
    "detectable_content:postscript": 10, "detectable_format:title": 10, "keywords:forbidden_words": 8,
    "detectable_content:number_placeholders": 8, "combination:repeat_prompt": 8,
    "detectable_format:constrained_response": 12, "detectable_format:number_highlighted_sections": 8,
    "keywords:frequency": 8, "combination:two_responses": 6, "detectable_format:multiple_sections": 6,
    "length_constraints:number_paragraphs": 6,
}
PAIRS = [
    ("change_case:english_lowercase", "punctuation:no_comma"),
    ("change_case:english_lowercase", "length_constraints:number_words"),
    ("change_case:english_capital", "length_constraints:number_words"),
    ("startend:quotation", "length_constraints:number_words"),
    ("punctuation:no_comma", "startend:end_checker"),
    ("keywords:existence", "length_constraints:number_words"),
    ("change_case:english_lowercase", "keywords:existence"),
    ("detectable_format:title", "punctuation:no_comma"),
    ("detectable_content:postscript", "change_case:english_lowercase"),
    ("detectable_format:number_bullet_lists", "punctuation:no_comma"),
    ("change_case:english_lowercase", "startend:end_checker"),
    ("change_case:english_capital", "punctuation:no_comma"),
    ("startend:quotation", "keywords:existence"),
    ("detectable_format:number_highlighted_sections", "punctuation:no_comma"),
    ("detectable_format:json_format", "keywords:existence"),
]
ROWS_PER_PAIR = 2


def _instruction_row(rng: random.Random, ids: tuple[str, ...], key: int) -> dict:
    topic = rng.choice(INSTRUCTION_TOPICS)
    if "detectable_format:constrained_response" in ids:
        task = rng.choice(YES_NO_QUESTIONS)
    else:
        task = rng.choice(BASE_TASKS).format(topic=topic[0])
    kwargs = [SPECS[i].draw(rng, topic) for i in ids]
    texts = [SPECS[i].text(k) for i, k in zip(ids, kwargs, strict=True)]
    if "combination:repeat_prompt" in ids:
        kwargs[ids.index("combination:repeat_prompt")] = {"prompt_to_repeat": task}
        prompt = f"{REPEAT_REQUEST} {task}"
    else:
        prompt = " ".join([task] + texts)
    return {"key": key, "category": "instructions", "prompt": prompt, "instruction_id_list": list(ids),
            "kwargs": kwargs, "max_new_tokens": max(SPECS[i].budget for i in ids)}


def instruction_rows(rng: random.Random) -> list[dict]:
    """Every instruction row, in table order (the caller shuffles)."""
    plan = [(i,) for i, n in SINGLE_COUNTS.items() for _ in range(n)]
    plan += [pair for pair in PAIRS for _ in range(ROWS_PER_PAIR)]
    rows: list[dict] = []
    seen: set[str] = set()
    for key, ids in enumerate(plan, start=1):
        row = _instruction_row(rng, ids, key)
        while row["prompt"] in seen:  # the same prompt twice would count one answer twice
            row = _instruction_row(rng, ids, key)
        seen.add(row["prompt"])
        rows.append(row)
    return rows
