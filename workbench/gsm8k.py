"""GSM8K-format answers: the number after the last `####` (`parse_gsm8k_answer`, the pattern `GSM8K_ANSWER`).

A light top-level module, not in `workbench.data` (whose package imports the data stack): the evaluator imports it
without datasets or torch."""

from __future__ import annotations

import re

__all__ = ["GSM8K_ANSWER", "parse_gsm8k_answer"]

GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\d(?:\.\d+)?)")


def parse_gsm8k_answer(text: str) -> int | None:
    """Return the integer after the last ``####`` marker, or None if absent or not an integer."""
    matches = GSM8K_ANSWER.findall(text)
    if not matches:
        return None
    number = float(matches[-1].replace(",", ""))
    return int(number) if number.is_integer() else None
