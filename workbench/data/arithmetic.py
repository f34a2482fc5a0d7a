"""Seeded multi-step arithmetic word problems in GSM8K format (one explicit equation per reasoning line, then
``#### N``): deterministic given :class:`ArithmeticConfig` (a private ``random.Random``)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from workbench.data.synthetic import capitalize_first

# ----------------------------------------------------------------------------------------------------------
# Arithmetic word problems (GSM8K format)
# ----------------------------------------------------------------------------------------------------------

PEOPLE: tuple[tuple[str, str], ...] = (
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Zara", "she"), ("Omar", "he"),
    ("Priya", "she"), ("Mateo", "he"), ("Hana", "she"), ("Kofi", "he"), ("Elena", "she"), ("Ravi", "he"),
    ("Sofia", "she"), ("Jonas", "he"), ("Amara", "she"), ("Leo", "he"),
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells", "cookies", "stamps",
    "buttons", "crayons", "beads", "toy cars", "postcards", "seeds",
)  # fmt: skip

# operation -> list of (question clause, reasoning prefix); {p} pronoun, {pos} possessive, {k} operand.
_OP_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "+": (("{p} buys {k} more {obj}.", "After buying {k} more"),
          ("{p} finds {k} more {obj}.", "After finding {k} more"),
          ("a friend gives {obj_pron} {k} more {obj}.", "After receiving {k} more")),
    "-": (("{p} gives away {k} {obj}.", "After giving away {k}"),
          ("{p} loses {k} {obj}.", "After losing {k}"),
          ("{p} sells {k} {obj}.", "After selling {k}")),
    "*": (("{p} ends up with {k} times as many {obj} as before.", "With {k} times as many"),
          ("the number of {obj} {p} has becomes {k} times as large.", "Multiplying by {k}")),
    "/": (("{p} splits {pos} {obj} into {k} equal groups and keeps one group.", "Keeping one of {k} groups"),
          ("{p} shares {pos} {obj} equally among {k} people, {ref} included, and keeps {pos} share.",
           "Keeping one of {k} equal shares")),
}  # fmt: skip
_CONNECTIVES: tuple[str, ...] = ("Then ", "After that, ", "Next, ")
_PRONOUNS = {"she": ("her", "her", "herself"), "he": ("him", "his", "himself")}


@dataclass(frozen=True)
class ArithmeticConfig:
    """Size and difficulty of the arithmetic word-problem set.

    Every quantity in a problem (start value, intermediate and final values, add/subtract operands) lies
    in ``[2, max_value]``; multiply/divide factors lie in ``[2, 5]``.
    """

    num_problems: int = 1000
    num_steps: int = 3
    seed: int = 0
    max_value: int = 100

    def __post_init__(self) -> None:
        if self.num_problems < 1:
            raise ValueError(f"num_problems must be >= 1, got {self.num_problems}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.max_value < 10:
            raise ValueError(f"max_value must be >= 10, got {self.max_value}")


def _feasible_ops(value: int, max_value: int) -> dict[str, list[int]]:
    """Operands keeping the running value in [2, max_value], per operation (empty ops dropped)."""
    ops = {
        "+": list(range(2, max_value - value + 1)),
        "-": list(range(2, value - 1)),
        "*": [f for f in range(2, 6) if value * f <= max_value],
        "/": [d for d in range(2, 6) if value % d == 0 and value // d >= 2],
    }
    return {op: operands for op, operands in ops.items() if operands}


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def _make_problem(rng: random.Random, cfg: ArithmeticConfig) -> tuple[str, str, int]:
    name, pron = rng.choice(PEOPLE)
    obj_pron, pos, ref = _PRONOUNS[pron]
    obj = rng.choice(OBJECTS)
    value = rng.randint(2, cfg.max_value)
    question = [f"{name} has {value} {obj}."]
    reasoning: list[str] = []
    for step in range(cfg.num_steps):
        ops = _feasible_ops(value, cfg.max_value)
        op = rng.choice(sorted(ops))
        k = rng.choice(ops[op])
        clause, prefix = rng.choice(_OP_TEMPLATES[op])
        fill = {"p": pron, "pos": pos, "ref": ref, "obj_pron": obj_pron, "k": k, "obj": obj}
        clause = clause.format(**fill)
        question.append(capitalize_first(clause) if step == 0 else rng.choice(_CONNECTIVES) + clause)
        result = _apply(op, value, k)
        subject = name if step == 0 else pron
        reasoning.append(f"{prefix.format(k=k)}, {subject} has {value} {op} {k} = {result} {obj}.")
        value = result
    question.append(f"How many {obj} does {name} have now?")
    return " ".join(question), "\n".join(reasoning) + f"\n#### {value}", value


def arithmetic_problems(cfg: ArithmeticConfig | None = None) -> Dataset:
    """Multi-step word problems with GSM8K-style answers (one explicit equation per line, then ``#### N``)."""
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(f"{cfg.seed}:arithmetic")
    rows: dict[str, list] = {"question": [], "answer": [], "final_answer": [], "num_steps": []}
    for _ in range(cfg.num_problems):
        question, answer, final = _make_problem(rng, cfg)
        rows["question"].append(question)
        rows["answer"].append(answer)
        rows["final_answer"].append(final)
        rows["num_steps"].append(cfg.num_steps)
    return Dataset.from_dict(rows)
