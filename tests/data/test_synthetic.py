"""Tests for workbench.data.synthetic: determinism, fact consistency and arithmetic correctness."""

from __future__ import annotations

import random
import re

import pytest

from workbench.data.arithmetic import ArithmeticConfig, arithmetic_problems
from workbench.data.synthetic import ATTRIBUTES, FactWorld, FactWorldConfig
from workbench.gsm8k import parse_gsm8k_answer

EQUATION = re.compile(r"(\d+) ([+\-*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return FactWorld.build(FactWorldConfig(num_entities=60, seed=3, attributes_per_entity=5))


def _all_splits(world: FactWorld) -> list[list[dict]]:
    return [
        world.corpus().to_list(),
        world.qa().to_list(),
        world.multiple_choice().to_list(),
        world.true_false().to_list(),
    ]


# ---------------------------------------------------------------------------------------------- determinism


def test_fact_world_deterministic_and_seed_dependent() -> None:
    cfg = FactWorldConfig(num_entities=20, seed=7)
    a, b = FactWorld(cfg), FactWorld.build(cfg)
    assert a.entities == b.entities
    assert _all_splits(a) == _all_splits(b)
    c = FactWorld(FactWorldConfig(num_entities=20, seed=8))
    assert a.entities != c.entities
    assert a.corpus().to_list() != c.corpus().to_list()


def test_independent_of_global_random_state() -> None:
    cfg = FactWorldConfig(num_entities=15, seed=1)
    acfg = ArithmeticConfig(num_problems=30, seed=1)
    random.seed(123)
    first = (_all_splits(FactWorld(cfg)), arithmetic_problems(acfg).to_list())
    random.seed(999)
    random.random()
    second = (_all_splits(FactWorld(cfg)), arithmetic_problems(acfg).to_list())
    assert first == second


def test_arithmetic_deterministic_and_seed_dependent() -> None:
    cfg = ArithmeticConfig(num_problems=50, seed=5)
    assert arithmetic_problems(cfg).to_list() == arithmetic_problems(cfg).to_list()
    other = arithmetic_problems(ArithmeticConfig(num_problems=50, seed=6)).to_list()
    assert arithmetic_problems(cfg).to_list() != other


# ---------------------------------------------------------------------------------------------- fact world


def test_entities_unique_with_expected_attributes(world: FactWorld) -> None:
    names = [e.name for e in world.entities]
    assert len(names) == len(set(names)) == 60
    specs = {spec.name: spec for spec in ATTRIBUTES}
    for entity in world.entities:
        assert len(entity.attributes) == 5
        for attr, value in entity.attributes.items():
            assert value in specs[attr].values


def test_large_world_names_unique() -> None:
    names = [e.name for e in FactWorld(FactWorldConfig(num_entities=2000, attributes_per_entity=1)).entities]
    assert len(set(names)) == 2000


def test_corpus_mentions_every_fact(world: FactWorld) -> None:
    corpus = world.corpus(sentences_per_fact=3)
    assert corpus.column_names == ["text", "entity"]
    assert len(corpus) == len(world.entities)
    for row, entity in zip(corpus, world.entities, strict=True):
        assert row["entity"] == entity.name
        text = row["text"].lower()
        assert entity.name.lower() in text
        for value in entity.attributes.values():
            assert text.count(value.lower()) >= 3
        assert row["text"].count(".") >= 3 * len(entity.attributes)


def test_corpus_sentences_per_fact(world: FactWorld) -> None:
    one = world.corpus(sentences_per_fact=1)
    for row, entity in zip(one, world.entities, strict=True):
        for value in entity.attributes.values():
            assert value.lower() in row["text"].lower()
    with pytest.raises(ValueError, match="sentences_per_fact"):
        world.corpus(sentences_per_fact=0)


def test_qa_answers_match_entities(world: FactWorld) -> None:
    by_name = {e.name: e for e in world.entities}
    qa = world.qa()
    assert set(qa.column_names) == {"question", "answer", "statement", "entity", "attribute"}
    assert len(qa) == sum(len(e.attributes) for e in world.entities)
    for row in qa:
        assert row["entity"] in row["question"]
        assert row["question"].endswith("?")
        assert by_name[row["entity"]].attributes[row["attribute"]] == row["answer"]


def test_entity_selection_disjoint(world: FactWorld) -> None:
    train = world.qa(entities=list(range(0, 30)))
    test = world.qa(entities=list(range(30, 60)))
    assert set(train["entity"]).isdisjoint(test["entity"])
    assert set(world.qa(entities=slice(0, 30))["entity"]) == set(train["entity"])
    assert set(world.multiple_choice(entities=[1, 2])["entity"]) == {world.entities[i].name for i in (1, 2)}
    assert set(world.true_false(entities=[5])["entity"]) == {world.entities[5].name}
    with pytest.raises(IndexError):
        world.qa(entities=[60])


@pytest.mark.parametrize("num_choices", [2, 4, 8])
def test_multiple_choice(world: FactWorld, num_choices: int) -> None:
    by_name = {e.name: e for e in world.entities}
    specs = {spec.name: spec for spec in ATTRIBUTES}
    mc = world.multiple_choice(num_choices=num_choices)
    labels = set()
    for row in mc:
        truth = by_name[row["entity"]].attributes[row["attribute"]]
        choices = row["choices"]
        assert len(choices) == len(set(choices)) == num_choices
        assert choices[row["label"]] == truth
        assert sum(c == truth for c in choices) == 1
        assert all(c in specs[row["attribute"]].values for c in choices)
        labels.add(row["label"])
    assert labels == set(range(num_choices))


def test_multiple_choice_invalid(world: FactWorld) -> None:
    for bad in (1, 9, 100):
        with pytest.raises(ValueError, match="num_choices"):
            world.multiple_choice(num_choices=bad)


def test_true_false_balanced_and_correct(world: FactWorld) -> None:
    by_name = {e.name: e for e in world.entities}
    specs = {spec.name: spec for spec in ATTRIBUTES}
    tf = world.true_false()
    assert len(tf) == sum(len(e.attributes) for e in world.entities)
    assert abs(sum(tf["label"]) * 2 - len(tf)) <= 1
    for row in tf:
        truth = by_name[row["entity"]].attributes[row["attribute"]]
        values_in_statement = [v for v in specs[row["attribute"]].values if _mentions(row["statement"], v)]
        assert len(values_in_statement) == 1, row
        assert (values_in_statement[0] == truth) == (row["label"] == 1)


def _mentions(statement: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value.lower())}\b", statement.lower()) is not None


def test_fact_world_config_validation() -> None:
    with pytest.raises(ValueError, match="attributes_per_entity"):
        FactWorldConfig(attributes_per_entity=len(ATTRIBUTES) + 1)
    with pytest.raises(ValueError, match="attributes_per_entity"):
        FactWorldConfig(attributes_per_entity=0)
    with pytest.raises(ValueError, match="num_entities"):
        FactWorldConfig(num_entities=0)
    FactWorldConfig(attributes_per_entity=len(ATTRIBUTES))


# ---------------------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("num_steps", [1, 3, 6])
def test_arithmetic_reasoning_is_correct(num_steps: int) -> None:
    cfg = ArithmeticConfig(num_problems=200, num_steps=num_steps, seed=num_steps, max_value=60)
    data = arithmetic_problems(cfg)
    assert set(data.column_names) == {"question", "answer", "final_answer", "num_steps"}
    seen_ops = set()
    for row in data:
        body, final = row["answer"].split("\n#### ")
        lines = body.split("\n")
        assert len(lines) == num_steps == row["num_steps"]
        previous = None
        for line in lines:
            (a, op, b, c), *rest = EQUATION.findall(line)
            assert not rest
            a, b, c = int(a), int(b), int(c)
            assert OPS[op](a, b) == c
            assert previous is None or a == previous
            assert 2 <= c <= cfg.max_value
            seen_ops.add(op)
            previous = c
        assert int(final) == previous == row["final_answer"] == parse_gsm8k_answer(row["answer"])
        assert row["question"].rstrip().endswith("?")
        assert str(int(EQUATION.findall(lines[0])[0][0])) in row["question"]
    assert seen_ops == {"+", "-", "*", "/"}


def test_parse_gsm8k_answer() -> None:
    assert parse_gsm8k_answer("a\nb = 3\n#### 14") == 14
    assert parse_gsm8k_answer("#### 1,234") == 1234
    assert parse_gsm8k_answer("####-5") == -5
    assert parse_gsm8k_answer("#### 7.0") == 7
    assert parse_gsm8k_answer("#### 7.5") is None
    assert parse_gsm8k_answer("no answer here") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_problems": 0}, "num_problems"),
        ({"max_value": 5}, "max_value"),
    ],
)
def test_arithmetic_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ArithmeticConfig(**kwargs)


def test_statement_and_cloze_forms_match_the_facts():
    world = FactWorld(FactWorldConfig(num_entities=30, seed=3))
    for row in world.qa():
        assert row["entity"] in row["statement"] and row["answer"] in row["statement"]
    for row in world.multiple_choice():
        assert row["cloze"].count("___") == 1 and row["entity"] in row["cloze"]
        assert not row["cloze"].startswith("___")


def test_held_out_cloze_template_never_appears_and_other_templates_still_do():
    from workbench.data.synthetic import _ATTRIBUTE_BY_NAME, _cloze_template, _render

    world = FactWorld(FactWorldConfig(num_entities=20, seed=4))
    for hold in (False, True):
        text = " ".join(world.corpus(sentences_per_fact=6, hold_out_cloze=hold)["text"])
        cloze = [_render(_cloze_template(_ATTRIBUTE_BY_NAME[a]), e.name, v)
                 for e in world.entities for a, v in e.attributes.items()]
        assert sum(text.count(sentence) for sentence in cloze) == (0 if hold else 20 * 6 * 2)
        others = [_render(t, e.name, v) for e in world.entities for a, v in e.attributes.items()
                  for t in _ATTRIBUTE_BY_NAME[a].statements if t != _cloze_template(_ATTRIBUTE_BY_NAME[a])]
        assert sum(text.count(sentence) for sentence in others) == 20 * 6 * (6 if hold else 4)


@pytest.mark.parametrize(("qa_share", "other_share"), [(0.05, 0.0), (0.0, 0.5), (0.03, 0.7)])
def test_fact_corpus_shares_of_question_answer_and_other_world_text(qa_share, other_share):
    from workbench.data.loading import FactCorpusConfig, generator
    from workbench.data.synthetic import entity_pools

    options = FactCorpusConfig(num_entities=60, seed=1, sentences_per_fact=10, qa_share=qa_share,
                               other_share=other_share, hold_out_cloze=True)
    corpus = generator("synthetic:fact_world").build(options)
    world = FactWorld(FactWorldConfig(num_entities=60, seed=1))
    names = [e.name for e in world.entities]
    assert corpus["entity"][:60] == names  # the entity paragraphs first, in order
    chars = [len(t) for t in corpus["text"]]
    qa_rows = [i for i, t in enumerate(corpus["text"]) if t.startswith("Question: ")]
    other_rows = [i for i in range(60, len(corpus)) if i not in qa_rows]
    assert sum(chars[i] for i in qa_rows) / sum(chars) == pytest.approx(qa_share, abs=0.01)
    assert sum(chars[i] for i in other_rows) / sum(chars) == pytest.approx(other_share, abs=0.01)
    _, sft, fewshot = entity_pools(60)
    assert {corpus["entity"][i] for i in qa_rows} <= {names[i] for i in sft + fewshot}  # never a test entity
    assert not {corpus["entity"][i] for i in other_rows} & set(names)  # another world's entities


def test_qa_documents_answer_with_the_facts():
    world = FactWorld(FactWorldConfig(num_entities=10, seed=2))
    docs = world.qa_documents(3000, entities=[7, 8])
    facts = {e.name: e for e in world.entities}
    for text, name in zip(docs["text"], docs["entity"], strict=True):
        pairs = text.split("\n\n")
        assert len(pairs) == len(facts[name].attributes)
        for pair in pairs:
            answer = pair.split("\nAnswer: ")[1]
            assert answer.split("The answer is ")[-1].rstrip(".") in facts[name].attributes.values()
