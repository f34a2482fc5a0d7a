"""Prompt styles: each turns a BOSE task spec into an lm-eval task config (a variant of the same items).

Multiple choice (`kind: multiple_choice`), every option scored by lm-eval's log-likelihood requests:
  zero_shot   the standard prompt ("Question: {q}\\nAnswer:" unless the spec sets `prompt`) + " {option}";
              acc and length-normalised acc_norm
  few_shot    the same after k solved examples
  iclip       BOSE's ICLiP: instruction L + k examples ending "The answer is {x}." + the item;
              options scored as " The answer is {option}."
  letter      options listed as "A. ...", the letter scored
  blank_ppl   BOSE's Blank-ppl: the item as a sentence with a blank, each option scored by the mean NLL of
              the span after the blank (workbench_eval.scoring.BlankPplScorer); the options are never listed
Open-ended (`kind: open`), greedy generation, exact match and F1 after SQuAD normalisation:
  zero_shot, few_shot  "Question: {q}\\nAnswer:", the first generated line is the answer
  iclip                L + k examples "Question: q\\nAnswer: {worked answer} The answer is {x}." + the item;
                       the answer is what follows "The answer is" (lm-eval regex filter)
  instruction_only     L and the item, no examples (the ICLiP ablation)
  completion           (specs with a `cloze`; not a default style) the item as the sentence before its blank,
                       e.g. "Velmora Tash was born in", greedily continued: the answer is the text up to the
                       first "." or line end. Fact recall of a model pretrained on statements, which has never
                       seen the question format
Worked (`kind: worked`), greedy generation of a worked answer ending "#### N", as lm-eval's gsm8k scores it:
  zero_shot   the standard prompt (the fine-tuning format QA_PROMPT); N after the last "####" (regex
              filter), exact_match against the gold number; stops at EOS, "\\n\\nQuestion:" or the budget
  few_shot    the same after k solved examples "Question: q\\nAnswer: {worked answer}"
  gold_nll    (not a default style) the NLL per token of the gold worked answer after the zero-shot prompt
              (lm-eval log-likelihood request, workbench_eval.scoring.GoldNllScorer): a validation loss on problems
              never trained on, comparable across checkpoints and across an SMoE's numbers of active experts
Any lm-eval task can also run as itself with style `native`.

Ambiguous choices of the spec (`docs/specs/bose.md`) are the fields of `StyleOptions`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench_eval.scoring import (
    NUMBER_PATTERN,
    NUMBER_VARIANTS,
    BlankPplScorer,
    GoldNllScorer,
    exact_match,
    first_line_answer,
    token_f1,
)
from workbench_eval.specs import SpecReader, TaskSpec

MC_STYLES = ("zero_shot", "few_shot", "iclip", "letter", "blank_ppl")
OPEN_STYLES = ("zero_shot", "few_shot", "iclip", "instruction_only")
OPEN_EXTRA_STYLES = ("completion",)  # valid for open specs with a cloze, run only when asked for
WORKED_EXTRA_STYLES = ("gold_nll",)  # valid for worked specs, run only when asked for
WORKED_STYLES = ("zero_shot", "few_shot")
_PLOT_ORDER = ("zero_shot", "few_shot", "iclip", "letter", "blank_ppl", "instruction_only", "completion", "gold_nll")


def style_colour(style: str) -> str:
    """One colour per prompt style in every plot (matplotlib's tab10, in a fixed order; other styles grey)."""
    base = style.split("@")[0]
    return f"C{_PLOT_ORDER.index(base)}" if base in _PLOT_ORDER else "0.45"
ICLIP_PATTERN = r"The answer is (.*)"


@dataclass(frozen=True)
class StyleOptions:
    num_fewshot: int = 3  # k examples for few_shot and iclip (tiny models have short contexts)
    open_instruction: str = "Answer the question. Finish with 'The answer is X'."  # ICLiP's L, open tasks
    mc_instruction: str = "Choose the correct answer. Finish with 'The answer is X'."  # ICLiP's L, MC
    until: tuple[str, ...] = ("\n", "Question:")  # generation stops; examples are one line each
    max_gen_toks: int = 24  # generated tokens per open-ended item
    worked_until: tuple[str, ...] = ("\n\nQuestion:",)  # worked answers: stops besides EOS (answers span lines)
    worked_tokens_per_line: int = 64  # worked answers' budget: this times the longest gold answer's lines
    blank_span: Literal["option+suffix", "option", "full"] = "option+suffix"  # scored span of Blank-ppl
    blank_norm: Literal["token", "byte", "none"] = "token"  # Blank-ppl length normalisation
    fewshot_sampler: Literal["first_n", "default"] = "first_n"  # lm-eval sampler: first k, or seeded random
    eigenscore: dict[str, Any] = field(default_factory=dict)  # task eigenscore: EigenScoreConfig fields
    extra: dict[str, Any] = field(default_factory=dict)


def styles_for(kind: str) -> tuple[str, ...]:
    """The styles a task of `kind` runs when none are asked for."""
    return {"multiple_choice": MC_STYLES, "open": OPEN_STYLES, "worked": WORKED_STYLES}[kind]


def valid_styles(spec: TaskSpec) -> tuple[str, ...]:
    """Every style `spec` can run in: the defaults, `completion` for open specs with a cloze, `gold_nll` for
    worked specs."""
    extra = {"open": OPEN_EXTRA_STYLES if spec.cloze else (), "worked": WORKED_EXTRA_STYLES}.get(spec.kind, ())
    return styles_for(spec.kind) + extra


def _base(spec: TaskSpec, style: str, data: dict[str, Any], opts: StyleOptions) -> dict[str, Any]:
    return {
        "task": f"{spec.task}.{style}",
        **data,
        "num_fewshot": 0,
        "fewshot_config": {"sampler": opts.fewshot_sampler},
        "metadata": {**data.get("metadata", {}), "version": 1.0, "style": style},
    }


def _mc_config(spec: TaskSpec, style: str, data: dict[str, Any], opts: StyleOptions) -> dict[str, Any]:
    read = SpecReader(spec)
    cfg = _base(spec, style, data, opts)
    cfg.update(output_type="multiple_choice", doc_to_target=read.gold, target_delimiter=" ",
               doc_to_text=read.prompt, doc_to_choice=read.choices,
               metric_list=[_metric("acc"), _metric("acc_norm")])
    if style == "few_shot":
        cfg["num_fewshot"] = opts.num_fewshot
    elif style == "iclip":
        cfg.update(num_fewshot=opts.num_fewshot, description=opts.mc_instruction + "\n\n",
                   doc_to_choice=lambda d: [f"The answer is {c}." for c in read.choices(d)])
    elif style == "letter":
        def listed(d: dict) -> str:
            options = "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(read.choices(d)))
            return f"Question: {read.question(d)}\n{options}\nAnswer:"

        cfg.update(doc_to_text=listed, metric_list=[_metric("acc")],
                   doc_to_choice=lambda d: list(string.ascii_uppercase[: len(read.choices(d))]))
    elif style == "blank_ppl":
        cfg.update(_blank_ppl(read, opts))
    return cfg


def _blank_ppl(read: SpecReader, opts: StyleOptions) -> dict[str, Any]:
    def parts(d: dict) -> tuple[str, str]:
        return read.cloze(d) or (read.prompt(d), "")

    def context(d: dict) -> str:
        return "" if opts.blank_span == "full" else parts(d)[0]

    def continuations(d: dict) -> list[str]:
        before, after = parts(d)
        suffix = "" if opts.blank_span == "option" else after
        if opts.blank_span == "full":
            return [f"{before} {c}{suffix}" for c in read.choices(d)]
        return [f" {c}{suffix}" for c in read.choices(d)]

    scorer = BlankPplScorer(context, continuations, read.gold, norm=opts.blank_norm)
    return {"doc_to_text": context, "target_delimiter": "", "doc_to_choice": continuations,
            "process_results": scorer, "metric_list": [_metric("acc"), _metric("gold_ppl", higher=False)]}


def _open_config(spec: TaskSpec, style: str, data: dict[str, Any], opts: StyleOptions) -> dict[str, Any]:
    read = SpecReader(spec)
    cfg = _base(spec, style, data, opts)
    extract = style in ("iclip", "instruction_only")

    def score(doc: dict, results: list[str]) -> dict[str, float]:
        answer = results[0] if extract else first_line_answer(results[0])
        if style == "completion":
            answer = answer.split(".")[0]
        answer = answer.strip()
        gold = read.answer(doc)
        return {"em": exact_match(answer, gold), "f1": token_f1(answer, gold)}

    cfg.update(output_type="generate_until", doc_to_text=read.prompt,
               doc_to_target=read.answer, target_delimiter=" ", process_results=score,
               generation_kwargs={"until": list(opts.until), "max_gen_toks": opts.max_gen_toks, "do_sample": False},
               metric_list=[_metric("em"), _metric("f1")])
    if style == "few_shot":
        cfg["num_fewshot"] = opts.num_fewshot
    if style == "completion":
        cfg.update(doc_to_text=lambda d: read.cloze(d)[0], target_delimiter=" ", generation_kwargs={
            "until": [".", "\n"], "max_gen_toks": opts.max_gen_toks, "do_sample": False})
    if extract:
        cfg["description"] = opts.open_instruction + "\n\n"
        cfg["filter_list"] = [{"name": style, "filter": [
            {"function": "regex", "regex_pattern": ICLIP_PATTERN, "fallback": ""},
            {"function": "take_first"}]}]
    if style == "iclip":
        cfg["num_fewshot"] = opts.num_fewshot
        cfg["fewshot_config"] = {**cfg["fewshot_config"],
                                 "doc_to_target": lambda d: f"{read.worked(d)} The answer is {read.answer(d)}.".strip()}
    return cfg


def _worked_config(spec: TaskSpec, style: str, data: dict[str, Any], opts: StyleOptions) -> dict[str, Any]:
    """lm-eval's gsm8k recipe: generate, keep the number after the last "####" (regex filter, the pattern of
    `parse_gsm8k_answer`), exact_match against the gold number with the number's spelling variants ignored.

    Budget: `worked_tokens_per_line` per line of the longest gold worked answer among the task's documents
    (3 steps: 3 equations + "#### N" = 4 lines, 256 tokens), so longer problems get room to finish."""
    read = SpecReader(spec)
    cfg = _base(spec, style, data, opts)
    lines = max(len(read.worked(d).splitlines()) for d in data["custom_dataset"]()["test"])
    cfg.update(output_type="generate_until", doc_to_text=read.prompt, doc_to_target=read.answer, target_delimiter=" ",
               fewshot_config={**cfg["fewshot_config"], "doc_to_target": read.worked},
               generation_kwargs={"until": list(opts.worked_until), "do_sample": False,
                                  "max_gen_toks": opts.worked_tokens_per_line * lines},
               filter_list=[{"name": "last_number", "filter": [
                   {"function": "regex", "regex_pattern": NUMBER_PATTERN, "group_select": -1},
                   {"function": "take_first"}]}],
               metric_list=[{**_metric("exact_match"), "regexes_to_ignore": list(NUMBER_VARIANTS)}])
    if style == "few_shot":
        cfg["num_fewshot"] = opts.num_fewshot
    if style == "gold_nll":
        def gold(d: dict) -> str:  # the fine-tuning format: the prompt, a space, the worked answer
            return f" {read.worked(d)}"

        scorer = GoldNllScorer(read.prompt, lambda d: [gold(d)], lambda d: 0)
        cfg.update(output_type="loglikelihood", doc_to_target=gold, target_delimiter="", process_results=scorer,
                   metric_list=[_metric("nll", higher=False)])
        for unused in ("generation_kwargs", "filter_list"):
            cfg.pop(unused)
    return cfg


def _metric(name: str, higher: bool = True) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": higher}


def task_config(spec: TaskSpec, style: str, data: dict[str, Any], opts: StyleOptions) -> dict[str, Any]:
    """The lm-eval config of `spec` in `style` (a plain dict that `ConfigurableTask(config=...)` takes)."""
    valid = valid_styles(spec)
    if style not in valid:
        from workbench.errors import ConfigError, did_you_mean

        raise ConfigError(
            f"task '{spec.task}': unknown style '{style}'{did_you_mean(style, valid)}; "
            f"valid for {spec.kind}: {', '.join(valid)}"
        )
    build = {"multiple_choice": _mc_config, "open": _open_config, "worked": _worked_config}[spec.kind]
    return build(spec, style, data, opts)
