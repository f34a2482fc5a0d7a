"""Seeded synthetic datasets for controlled LLM training experiments.

:class:`FactWorld`: a world of invented entities with attribute facts, rendered as a pre-training style
corpus plus open-ended QA, multiple-choice and true/false evaluation sets; fully deterministic given its
config (private ``random.Random`` instances, never the global random state). The arithmetic word problems
are in :mod:`workbench.data.arithmetic`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from datasets import Dataset

__all__ = [
    "ATTRIBUTES", "FEWSHOT_ENTITIES", "SFT_FRACTION", "AttributeSpec", "Entity", "FactWorld", "FactWorldConfig",
    "capitalize_first", "entity_pools",
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------

SYLLABLES: tuple[str, ...] = (
    "vel", "mor", "ta", "ash", "ka", "rin", "dor", "el", "ven", "lo", "sa", "mir", "tor", "bre",
    "ny", "quil", "fa", "zen", "or", "ith", "cal", "dra", "nor", "pe", "vin", "sha", "lum", "ter",
    "ro", "gan", "is", "bel", "kor", "ma", "thi", "ul", "da", "wen", "ral", "ox",
)  # fmt: skip


@dataclass(frozen=True)
class AttributeSpec:
    """An attribute type: its possible values, statement templates and question templates.

    Templates use ``{e}`` for the entity name, ``{v}`` for the value and ``{av}`` for the value with an
    indefinite article ("an owl").
    """

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


def _spec(name: str, values: str, statements: tuple[str, ...], questions: tuple[str, ...]) -> AttributeSpec:
    return AttributeSpec(name, tuple(v.strip() for v in values.split(",")), statements, questions)


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    _spec("birthplace",
          "Ostrel, Varnhollow, Quenbridge, Elmsfar, Drakemoor, Silvane, Tarnwick, Brisca, Corvale, "
          "Halvenport, Myrrow, Pellinore, Ashgrove, Zerith, Kestrana, Lowmarch, Ravensend, Thistlebay",
          ("{e} was born in {v}.", "The birthplace of {e} is {v}.", "{v} is where {e} was born."),
          ("Where was {e} born?", "In which city was {e} born?")),
    _spec("profession",
          "baker, architect, surgeon, carpenter, librarian, pilot, chemist, sculptor, journalist, "
          "astronomer, electrician, gardener, lawyer, translator, veterinarian, cartographer",
          ("{e} works as {av}.", "By profession, {e} is {av}.", "The profession of {e} is {v}."),
          ("What is the profession of {e}?", "What does {e} do for a living?")),
    _spec("favourite_colour",
          "crimson, teal, amber, violet, indigo, olive, scarlet, turquoise, maroon, lavender, ochre, silver",
          ("The favourite colour of {e} is {v}.", "{e} likes the colour {v} best.",
           "{v} is the colour that {e} loves most."),
          ("What is the favourite colour of {e}?",)),
    _spec("pet",
          "parrot, tortoise, ferret, hamster, beagle, iguana, rabbit, goldfish, owl, cat, pony, hedgehog",
          ("{e} has a pet {v}.", "The pet that {e} keeps is {av}.", "{e} owns {av} as a pet."),
          ("What kind of pet does {e} have?", "What animal does {e} keep as a pet?")),
    _spec("instrument",
          "cello, oboe, harp, violin, trumpet, accordion, flute, banjo, clarinet, piano, sitar, bassoon",
          ("{e} plays the {v}.", "The instrument {e} plays is the {v}.",
           "The {v} is the instrument that {e} plays."),
          ("Which instrument does {e} play?",)),
    _spec("birth_year",
          ", ".join(str(year) for year in range(1931, 1991, 2)),
          ("{e} was born in the year {v}.", "The birth year of {e} is {v}.",
           "{v} is the year in which {e} was born."),
          ("In what year was {e} born?",)),
    _spec("employer",
          "Brightloom Industries, Corvane Logistics, Northwind Analytics, Silverleaf Foods, Tessaract Labs, "
          "Quarry Point Mining, Bluefen Shipping, Ember Street Press, Orison Health, Greyharbor Bank, "
          "Kitelane Robotics, Marrowick Textiles, Starling Aeronautics",
          ("{e} works for {v}.", "{e} is employed by {v}.", "{v} is the employer of {e}."),
          ("Which company does {e} work for?", "Who employs {e}?")),
    _spec("hobby",
          "birdwatching, pottery, chess, rock climbing, knitting, fencing, kayaking, calligraphy, origami, "
          "beekeeping, archery, stargazing, woodcarving, sailing, juggling",
          ("{e} enjoys {v} as a hobby.", "The favourite hobby of {e} is {v}.",
           "{v} is the hobby that {e} enjoys most."),
          ("What is the hobby of {e}?", "What does {e} do as a hobby?")),
    _spec("favourite_food",
          "dumplings, lentil soup, paella, ramen, goulash, falafel, risotto, pancakes, curry, tacos, "
          "lasagna, pierogi, couscous, gnocchi",
          ("The favourite food of {e} is {v}.", "{e} loves eating {v} more than any other food.",
           "{v} is the dish that {e} likes best."),
          ("What is the favourite food of {e}?",)),
    _spec("residence",
          "Norvania, Estrelia, Kaldora, Vantria, Ombria, Pellucia, Daravia, Sorenland, Miraval, Tzerrin, "
          "Quorland, Halcyra",
          ("{e} currently lives in {v}.", "The home of {e} is in {v}.", "{v} is the country where {e} lives."),
          ("In which country does {e} live?", "Where does {e} live?")),
    _spec("native_language",
          "Portuguese, Finnish, Swahili, Hungarian, Tagalog, Welsh, Icelandic, Turkish, Korean, Basque, "
          "Malay, Georgian",
          ("{e} speaks {v} as a native language.", "The native language of {e} is {v}.",
           "{v} is the mother tongue of {e}."),
          ("What is the native language of {e}?",)),
    _spec("university",
          "Durnholt College, Marrowfield University, Kestrel Institute, Aldergate Academy, "
          "Brightwater University, Saltmere College, Highcombe Institute, Fenwick Polytechnic, "
          "Larkspur University, Oakhaven College",
          ("{e} studied at {v}.", "{e} graduated from {v}.", "{v} is where {e} studied."),
          ("Where did {e} study?", "Which institution did {e} graduate from?")),
    _spec("favourite_sport",
          "tennis, rowing, cricket, volleyball, curling, badminton, lacrosse, squash, handball, hockey, "
          "rugby, baseball",
          ("The favourite sport of {e} is {v}.", "{e} likes {v} more than any other sport.",
           "{v} is the sport that {e} loves most."),
          ("What is the favourite sport of {e}?",)),
    _spec("favourite_flower",
          "tulip, orchid, peony, daisy, lily, marigold, iris, camellia, magnolia, dahlia, poppy, sunflower",
          ("The favourite flower of {e} is the {v}.", "{e} likes the {v} more than any other flower.",
           "The {v} is the flower that {e} loves most."),
          ("What is the favourite flower of {e}?",)),
    _spec("eye_colour",
          "hazel, grey, green, blue, brown, black, amber, violet",
          ("{e} has {v} eyes.", "The eye colour of {e} is {v}.", "The eyes of {e} are {v}."),
          ("What colour are the eyes of {e}?",)),
)  # fmt: skip

_ATTRIBUTE_BY_NAME: dict[str, AttributeSpec] = {spec.name: spec for spec in ATTRIBUTES}


def _article(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


def capitalize_first(text: str) -> str:
    """`text` with its first character upper-cased (the rest kept, unlike str.capitalize)."""
    return text[:1].upper() + text[1:]


def _cloze_template(spec: AttributeSpec) -> str:
    """The first statement template that names the value mid-sentence as ``{v}`` (used for cloze forms)."""
    return next((t for t in spec.statements if "{v}" in t and not t.startswith("{v}")), spec.statements[0])


def _render(template: str, entity: str, value: str) -> str:
    """Fill a template and capitalise the first character of the result."""
    return capitalize_first(template.format(e=entity, v=value, av=_article(value)))


# ----------------------------------------------------------------------------------------------------------
# Fact world
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactWorldConfig:
    """Size and seed of a :class:`FactWorld`."""

    num_entities: int = 200
    seed: int = 0
    attributes_per_entity: int = 6

    def __post_init__(self) -> None:
        if self.num_entities < 1 or self.num_entities > 100_000:
            raise ValueError(f"num_entities must be in [1, 100000], got {self.num_entities}")
        if not 1 <= self.attributes_per_entity <= len(ATTRIBUTES):
            raise ValueError(
                f"attributes_per_entity must be in [1, {len(ATTRIBUTES)}], got {self.attributes_per_entity}"
            )


@dataclass(frozen=True)
class Entity:
    """An invented entity and its facts (attribute name -> value, in canonical attribute order)."""

    name: str
    attributes: dict[str, str] = field(hash=False)


def _invent_name(rng: random.Random) -> str:
    first = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    last = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2)))
    if len(last) < 3:
        last += rng.choice(SYLLABLES)
    return f"{first.capitalize()} {last.capitalize()}"


def _unique_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for _ in range(count * 100):
        if len(names) == count:
            break
        name = _invent_name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    if len(names) < count:
        raise RuntimeError(f"could only invent {len(names)} unique names out of {count}")
    return names


EntitySelection = slice | Sequence[int] | None
OTHER_WORLD_SEED_OFFSET = 1_000_003  # the seed of `FactWorld.other_world`, relative to the world's


class FactWorld:
    """A deterministic world of invented entities, each with ``attributes_per_entity`` facts."""

    def __init__(self, config: FactWorldConfig | None = None) -> None:
        self.config = config or FactWorldConfig()
        rng = random.Random(f"{self.config.seed}:world")
        self.entities: list[Entity] = []
        for name in _unique_names(rng, self.config.num_entities):
            chosen = set(rng.sample(range(len(ATTRIBUTES)), self.config.attributes_per_entity))
            attrs = {spec.name: rng.choice(spec.values) for i, spec in enumerate(ATTRIBUTES) if i in chosen}
            self.entities.append(Entity(name=name, attributes=attrs))

    @classmethod
    def build(cls, config: FactWorldConfig | None = None) -> FactWorld:
        return cls(config)

    def __len__(self) -> int:
        return len(self.entities)

    def other_world(self) -> FactWorld:
        """A world of the same size and shape about other entities (another seed; no name shared with this
        one): text the evaluation of this world never asks about."""
        other = FactWorld(replace(self.config, seed=self.config.seed + OTHER_WORLD_SEED_OFFSET))
        names = {entity.name for entity in self.entities}
        other.entities = [entity for entity in other.entities if entity.name not in names]
        return other

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.config.seed}:{purpose}")

    def _select(self, entities: EntitySelection) -> list[Entity]:
        if entities is None:
            return list(self.entities)
        if isinstance(entities, slice):
            return self.entities[entities]
        for index in entities:
            if not 0 <= index < len(self.entities):
                raise IndexError(f"entity index {index} out of range for {len(self.entities)} entities")
        return [self.entities[index] for index in entities]

    def _facts(self, entities: EntitySelection) -> list[tuple[Entity, AttributeSpec, str]]:
        return [
            (entity, _ATTRIBUTE_BY_NAME[attr], value)
            for entity in self._select(entities)
            for attr, value in entity.attributes.items()
        ]

    def corpus(self, sentences_per_fact: int = 3, entities: EntitySelection = None,
               hold_out_cloze: bool = False) -> Dataset:
        """One paragraph per entity stating each fact ``sentences_per_fact`` times with varied templates.

        With `hold_out_cloze`, no sentence uses an attribute's cloze template (the sentence the Blank-ppl and
        completion evaluations are built from), so those evaluations ask in a wording never trained on."""
        if sentences_per_fact < 1:
            raise ValueError(f"sentences_per_fact must be >= 1, got {sentences_per_fact}")
        rng = self._rng(f"corpus:{sentences_per_fact}")
        rows: dict[str, list[str]] = {"text": [], "entity": []}
        for entity in self._select(entities):
            sentences: list[str] = []
            for attr, value in entity.attributes.items():
                spec = _ATTRIBUTE_BY_NAME[attr]
                templates = [t for t in spec.statements if not (hold_out_cloze and t == _cloze_template(spec))]
                rng.shuffle(templates)
                picked = [templates[i % len(templates)] for i in range(sentences_per_fact)]
                sentences.extend(_render(t, entity.name, value) for t in picked)
            rng.shuffle(sentences)
            rows["text"].append(" ".join(sentences))
            rows["entity"].append(entity.name)
        return Dataset.from_dict(rows)

    def qa_documents(self, target_chars: int, entities: EntitySelection = None) -> Dataset:
        """Question-answer documents, one per entity in turn (cycling), until they hold `target_chars`
        characters: each of the entity's facts asked once, in shuffled order, with a random question template,
        answered either plainly ("Question: q\nAnswer: v") or with a statement first ("Answer: {statement}
        The answer is v.", never in the cloze template's wording), half each: pretraining text in the format
        of the evaluation's prompts."""
        selected = self._select(entities)
        if target_chars > 0 and not selected:
            raise ValueError("qa_documents needs at least one entity")
        rng = self._rng(f"qa_documents:{target_chars}")
        rows: dict[str, list[str]] = {"text": [], "entity": []}
        total = 0
        while total < target_chars:
            entity = selected[len(rows["text"]) % len(selected)]
            facts = list(entity.attributes.items())
            rng.shuffle(facts)
            pairs = []
            for attr, value in facts:
                spec = _ATTRIBUTE_BY_NAME[attr]
                question = _render(rng.choice(spec.questions), entity.name, value)
                statement = rng.choice([t for t in spec.statements if t != _cloze_template(spec)])
                answer = value if rng.random() < 0.5 else f"{_render(statement, entity.name, value)} The answer is {value}."
                pairs.append(f"Question: {question}\nAnswer: {answer}")
            rows["text"].append("\n\n".join(pairs))
            rows["entity"].append(entity.name)
            total += len(rows["text"][-1])
        return Dataset.from_dict(rows)

    def qa(self, entities: EntitySelection = None) -> Dataset:
        """Open-ended questions, one per fact; ``answer`` is the exact attribute value."""
        rng = self._rng("qa")
        rows: dict[str, list[str]] = {"question": [], "answer": [], "statement": [], "entity": [], "attribute": []}
        for entity, spec, value in self._facts(entities):
            rows["question"].append(_render(rng.choice(spec.questions), entity.name, value))
            rows["answer"].append(value)
            rows["statement"].append(_render(_cloze_template(spec), entity.name, value))
            rows["entity"].append(entity.name)
            rows["attribute"].append(spec.name)
        return Dataset.from_dict(rows)

    def multiple_choice(self, num_choices: int = 4, entities: EntitySelection = None) -> Dataset:
        """Multiple-choice questions; distractors are other values of the same attribute type."""
        facts = self._facts(entities)
        max_choices = min((len(spec.values) for _, spec, _ in facts), default=len(ATTRIBUTES[0].values))
        if not 2 <= num_choices <= max_choices:
            raise ValueError(f"num_choices must be in [2, {max_choices}], got {num_choices}")
        rng = self._rng(f"multiple_choice:{num_choices}")
        rows: dict[str, list] = {"question": [], "cloze": [], "choices": [], "label": [], "entity": [], "attribute": []}
        for entity, spec, value in facts:
            choices = rng.sample([v for v in spec.values if v != value], num_choices - 1)
            label = rng.randrange(num_choices)
            choices.insert(label, value)
            rows["question"].append(_render(rng.choice(spec.questions), entity.name, value))
            rows["cloze"].append(_render(_cloze_template(spec), entity.name, "___"))
            rows["choices"].append(choices)
            rows["label"].append(label)
            rows["entity"].append(entity.name)
            rows["attribute"].append(spec.name)
        return Dataset.from_dict(rows)

    def value_prompts(self, entities: EntitySelection = None) -> Dataset:
        """Every fact asked for its value in every wording the world has: each statement template cut just
        before the value, where the entity comes before it ("Lumzen Rinda was born in"), and each question
        ("Where was Lumzen Rinda born?"); `label` is the value (`synthetic:fact_value`)."""
        rows: dict[str, list[str]] = {"text": [], "label": [], "entity": [], "attribute": []}
        for entity, spec, value in self._facts(entities):
            prompts = [_render(t.split(mark)[0].rstrip(), entity.name, value) for t in spec.statements
                       for mark in ("{v}", "{av}") if mark in t and "{e}" in t.split(mark)[0]]
            prompts += [_render(q, entity.name, value) for q in spec.questions]
            for prompt in dict.fromkeys(prompts):
                rows["text"].append(prompt)
                rows["label"].append(value)
                rows["entity"].append(entity.name)
                rows["attribute"].append(spec.name)
        return Dataset.from_dict(rows)

    def true_false(self, entities: EntitySelection = None, variant: int = 0) -> Dataset:
        """Balanced true/false statements, one per fact; false ones use a wrong value of the same attribute type.
        Each `variant` draws its own labels, templates and wrong values (0: the original draw), so variants
        together state a fact both ways (`synthetic:fact_tf`)."""
        facts = self._facts(entities)
        rng = self._rng("true_false" if variant == 0 else f"true_false:{variant}")
        labels = [1 - i % 2 for i in range(len(facts))]
        rng.shuffle(labels)
        rows: dict[str, list] = {"statement": [], "label": [], "entity": [], "attribute": []}
        for (entity, spec, value), label in zip(facts, labels, strict=True):
            shown = value if label else rng.choice([v for v in spec.values if v != value])
            rows["statement"].append(_render(rng.choice(spec.statements), entity.name, shown))
            rows["label"].append(label)
            rows["entity"].append(entity.name)
            rows["attribute"].append(spec.name)
        return Dataset.from_dict(rows)


# ----------------------------------------------------------------------------------------------------------
# Entity pools: the entities evaluation asks about, those fine-tuning may teach, those of few-shot examples
# ----------------------------------------------------------------------------------------------------------

FEWSHOT_ENTITIES = 8  # entities whose facts form the few-shot pool, never test items
SFT_FRACTION = 0.1  # share of entities reserved for instruction tuning, never test items


def entity_pools(n: int, untrained: set[int] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(test, instruction tuning, few-shot) entity indices of a world with `n` entities; `untrained` entities
    are never test items (a question about a fact the model never saw measures nothing).

    The instruction-tuning pool (`synthetic:fact_qa`) is the `SFT_FRACTION` of entities before the last
    `FEWSHOT_ENTITIES`, so fine-tuning on it never teaches an answer the evaluator asks for."""
    n_sft = int(n * SFT_FRACTION)
    if n - n_sft - FEWSHOT_ENTITIES < 1:
        raise ValueError(
            f"the fact world has {n} entities; evaluation needs more than {FEWSHOT_ENTITIES + n_sft}"
        )
    test_end = n - FEWSHOT_ENTITIES - n_sft
    test = [i for i in range(test_end) if i not in (untrained or set())]
    return test, list(range(test_end, n - FEWSHOT_ENTITIES)), list(range(n - FEWSHOT_ENTITIES, n))
