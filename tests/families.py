"""The model families the workbench is tested on, as data: one tiny random model per family, saved to a folder
with a tokenizer that follows the family's conventions, and which features apply to it.

`FAMILIES` is the one list. `build_family_folder` writes a family's folder (config, seeded random weights,
tokenizer), which a run loads through `model.name_or_path: <folder>` as it would a downloaded model.
`feature_table` is the Markdown table of family x feature in docs/families.md:

    python -m tests.families --table

The tests: tests/test_family_matrix.py (fast tier: pretraining or classification, LoRA fine-tuning with the
completion mask), tests/integration/test_family_matrix_launch.py (DeepSpeed launches, the evaluator's loader, merge).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, processors
from transformers import PreTrainedTokenizerFast

from workbench.models.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

SEED = 1234  # the random weights of every family's model
VOCAB_SIZE = 400  # the BPE trained on the data below, before a family's special tokens

# The data of the matrix's runs (tiny `data` sections of an experiment config).
PRETRAINING_DATA = {"source": "synthetic:fact_world", "synthetic": {"num_entities": 120, "seed": 1},
                    "block_size": 32, "validation_fraction": 0.1}
FINETUNING_DATA = {"source": "synthetic:arithmetic", "synthetic": {"num_problems": 48, "num_steps": 2},
                   "block_size": 256}  # every example whole, its EOS included
CLASSIFICATION_DATA = {"source": "synthetic:fact_tf", "block_size": 32,
                       "synthetic": {"num_entities": 30, "seed": 1, "statements_per_fact": 2}}
CLASSIFICATION_LABELS = 2  # synthetic:fact_tf: false, true

CAUSAL_LM = "causal LM"
CLASSIFICATION = "classification"

RUN_FEATURES = ("pretraining", "lora", "completion_mask", "evaluator", "merge")
METHODS = ("drop_path", "dropout_schedule", "send", "masked_thought", "allora", "sinkd", "smoe_dropout")
FEATURES = RUN_FEATURES + METHODS
FEATURE_TITLES = {"pretraining": "pretraining", "lora": "LoRA (all-linear)", "completion_mask": "completion mask",
                  "evaluator": "evaluator loads checkpoint", "merge": "merge"}

# Why a feature does not apply, shared by the families it concerns.
NOT_CAUSAL = "needs a causal LM"
CLASSIFIER_TRAINING = "an encoder classifier: trained by the classification run kind instead"
CLASSIFIER_NO_LORA = "refused for classification runs (model.lora: the new head would not train)"
CLASSIFIER_NO_COMPLETION = "no completion: one label per text"
CLASSIFIER_NOT_EVALUATED = "the evaluator scores causal LMs (lm-eval); a classifier's eval_accuracy is the run's own"
CLASSIFIER_NO_MERGE = "merges a LoRA adapter, and classification runs have none"
NEEDS_LORA = "needs LoRA, refused for classification runs"
ALREADY_MOE = "already MoE: its MLPs are experts"
ROUTER_ADAPTED = ("refused: all-linear LoRA also adapts its router weight (a PEFT ParamWrapper), which ALLoRA's "
                  "per-row coefficients of linear layers do not cover; name the linear target_modules instead")


def trl_chat_template(name: str) -> str:
    """A chat template as the family's released tokenizer ships it, from TRL's copies (trl/chat_templates)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


MISTRAL_CHAT_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's [INST] template (no system role)
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Tokens:
    """A family's tokenizer conventions: its special tokens (None: the tokenizer has none of that kind; a run then
    pads with EOS, `workbench.models.load_tokenizer`), what every encoded text starts and ends with
    (`prefix`/`suffix`: e.g. Llama's BOS, OPT's `</s>`, BERT's `[CLS]`/`[SEP]`), and the chat template (the name of
    TRL's copy of the released one, or the template itself)."""

    eos: str | None
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    chat_template: str | None = None
    extra: tuple[str, ...] = ()  # further special tokens, e.g. the chat template's turn markers

    def special_tokens(self) -> list[str]:
        named = (self.bos, self.eos, self.pad, self.unk, self.prefix, self.suffix)
        return list(dict.fromkeys(t for t in (*named, *self.extra) if t is not None))

    def template(self) -> str | None:
        if self.chat_template is None or "{" in self.chat_template:
            return self.chat_template
        return trl_chat_template(self.chat_template)


@dataclass(frozen=True)
class Family:
    """One model family of the matrix: its transformers config class and tiny fields, the model class saved, the
    run kind, its tokenizer conventions, and the features it does not take with the reason (every other feature
    of `FEATURES` applies)."""

    name: str
    config_class: str  # a transformers config class name
    config: dict[str, Any]
    model_class: str  # a transformers model class name
    tokens: Tokens
    run_kind: str = CAUSAL_LM
    refused: dict[str, str] = field(default_factory=dict)  # feature -> why it does not apply
    moe: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.refused) - set(FEATURES)
        assert not unknown, f"{self.name}: unknown features {sorted(unknown)}"

    def applies(self, feature: str) -> bool:
        return feature not in self.refused

    def build_config(self, tokenizer: PreTrainedTokenizerFast) -> transformers.PretrainedConfig:
        """The tiny config, sized to `tokenizer` and naming its special tokens."""
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        if self.run_kind == CLASSIFICATION:
            special["num_labels"] = CLASSIFICATION_LABELS
        return getattr(transformers, self.config_class)(vocab_size=len(tokenizer), **special, **self.config)


def _decoder(hidden: int = 32, heads: int = 4, kv_heads: int = 2, **fields: Any) -> dict[str, Any]:
    """Llama-like config fields: 2 layers, grouped-query attention, intermediate 2x hidden, head_dim set."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
            "max_position_embeddings": 256, **fields}


LLAMA3_TOKENS = Tokens(bos="<|begin_of_text|>", eos="<|eot_id|>", prefix="<|begin_of_text|>",
                       chat_template="llama3", extra=("<|start_header_id|>", "<|end_header_id|>"))
MISTRAL_TOKENS = Tokens(bos="<s>", eos="</s>", unk="<unk>", prefix="<s>", chat_template=MISTRAL_CHAT_TEMPLATE)
CHATML_TOKENS = dict(eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>",))  # Qwen: no BOS at all
CLASSIFIER_REFUSED = {
    "pretraining": CLASSIFIER_TRAINING, "lora": CLASSIFIER_NO_LORA, "completion_mask": CLASSIFIER_NO_COMPLETION,
    "evaluator": CLASSIFIER_NOT_EVALUATED, "merge": CLASSIFIER_NO_MERGE,
    "masked_thought": NOT_CAUSAL, "allora": NEEDS_LORA,
}

FAMILIES: list[Family] = [
    Family("gpt2", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256},
           "GPT2LMHeadModel", Tokens(bos=EOS_TOKEN, eos=EOS_TOKEN)),
    Family("opt", "OPTConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "ffn_dim": 128, "word_embed_proj_dim": 32, "max_position_embeddings": 256},
           "OPTForCausalLM", Tokens(bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", prefix="</s>")),
    Family("gpt_neox", "GPTNeoXConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 128, "max_position_embeddings": 256},
           "GPTNeoXForCausalLM", Tokens(bos=EOS_TOKEN, eos=EOS_TOKEN)),
    Family("llama", "LlamaConfig", _decoder(), "LlamaForCausalLM", LLAMA3_TOKENS),
    Family("mistral", "MistralConfig", _decoder(sliding_window=None), "MistralForCausalLM", MISTRAL_TOKENS),
    Family("qwen2", "Qwen2Config", {k: v for k, v in _decoder().items() if k != "head_dim"}, "Qwen2ForCausalLM",
           Tokens(**CHATML_TOKENS, chat_template="qwen2_5")),  # Qwen2Config has no head_dim: hidden / heads
    Family("qwen3", "Qwen3Config", _decoder(), "Qwen3ForCausalLM", Tokens(**CHATML_TOKENS, chat_template="qwen3")),
    Family("gemma3", "Gemma3TextConfig", _decoder(query_pre_attn_scalar=8, sliding_window=16),
           "Gemma3ForCausalLM", Tokens(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", prefix="<bos>",
                                       chat_template="gemma3", extra=("<start_of_turn>", "<end_of_turn>"))),
    Family("phi3", "Phi3Config", {k: v for k, v in _decoder().items() if k != "head_dim"}, "Phi3ForCausalLM",
           Tokens(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", chat_template="phi3",
                  extra=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"))),  # Phi-3: no BOS added
    Family("falcon", "FalconConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "ffn_hidden_size": 128, "max_position_embeddings": 256},
           "FalconForCausalLM", Tokens(eos=EOS_TOKEN)),
    Family("olmo2", "Olmo2Config", {k: v for k, v in _decoder().items() if k != "head_dim"}, "Olmo2ForCausalLM",
           Tokens(bos=EOS_TOKEN, eos=EOS_TOKEN, pad=PAD_TOKEN)),
    Family("mixtral", "MixtralConfig", _decoder(sliding_window=None, num_local_experts=4, num_experts_per_tok=2),
           "MixtralForCausalLM", MISTRAL_TOKENS, refused={"smoe_dropout": ALREADY_MOE, "allora": ROUTER_ADAPTED},
           moe=True),
    Family("qwen2_moe", "Qwen2MoeConfig",
           {**{k: v for k, v in _decoder().items() if k != "head_dim"}, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2},
           "Qwen2MoeForCausalLM", Tokens(**CHATML_TOKENS, chat_template="qwen2_5"),
           refused={"smoe_dropout": ALREADY_MOE}, moe=True),
    Family("bert", "BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 128, "max_position_embeddings": 256},
           "BertForSequenceClassification", Tokens(eos=None, pad="[PAD]", unk="[UNK]", prefix="[CLS]",
                                                   suffix="[SEP]", extra=("[MASK]",)),
           run_kind=CLASSIFICATION, refused=CLASSIFIER_REFUSED),
]
FAMILY = {family.name: family for family in FAMILIES}


# ----------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------


def tokenizer_texts() -> Iterable[str]:
    """The texts of the matrix's data, which the families' BPE is trained on."""
    from workbench.config import DataConfig
    from workbench.data.loading import load_rows

    for data in (PRETRAINING_DATA, CLASSIFICATION_DATA):
        yield from load_rows(DataConfig(source=data["source"], synthetic=data["synthetic"]))["text"]
    for row in load_rows(DataConfig(source=FINETUNING_DATA["source"], synthetic=FINETUNING_DATA["synthetic"])):
        yield f"{row['question']} {row['answer']}"


@cache
def _trained_bpe() -> str:
    """The workbench's byte-level BPE on the matrix's texts (`train_bpe_tokenizer`), as tokenizer.json text."""
    return train_bpe_tokenizer(tokenizer_texts(), VOCAB_SIZE).backend_tokenizer.to_str()


def family_tokenizer(tokens: Tokens) -> PreTrainedTokenizerFast:
    """The workbench's BPE with a family's conventions: its special tokens, which of them every text starts and
    ends with, and its chat template. Without a pad token of its own it has none (runs pad with EOS)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_trained_bpe())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens.special_tokens()])
    template = " ".join(t for t in (tokens.prefix, "$A", tokens.suffix) if t is not None)
    pair = " ".join(t for t in (tokens.prefix, "$A", tokens.suffix, "$B:1", tokens.suffix) if t is not None)
    marks = [(t, backend.token_to_id(t)) for t in dict.fromkeys((tokens.prefix, tokens.suffix)) if t is not None]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=template, pair=pair, special_tokens=marks),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tokens.bos, eos_token=tokens.eos,
                                   pad_token=tokens.pad, unk_token=tokens.unk, chat_template=tokens.template(),
                                   model_max_length=2048)


def build_family_folder(family: Family, folder: Path) -> Path:
    """Write `family`'s tiny model (seeded random weights, fp32 safetensors) and tokenizer to `folder`."""
    tokenizer = family_tokenizer(family.tokens)
    config = family.build_config(tokenizer)
    torch.manual_seed(SEED)
    model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def traced_description(family: Family) -> str:
    """What `workbench.models.structure` finds in the family's tiny model, traced from its config alone."""
    from workbench.models.structure import traced_sites

    extra = {"num_labels": CLASSIFICATION_LABELS} if family.run_kind == CLASSIFICATION else {}
    special = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))  # ids beyond the 64 rows otherwise
    config = getattr(transformers, family.config_class)(vocab_size=64, **special, **family.config, **extra)
    return traced_sites(config, getattr(transformers, family.model_class)).describe()


def feature_table() -> str:
    """The Markdown table of family x feature: ✓ where the feature applies, else why not; and the sites the
    methods act on, as `workbench.models.structure` finds them."""
    titles = [FEATURE_TITLES.get(feature, f"`{feature}`") for feature in FEATURES]
    lines = ["| family | model class | sites found (by structure) | " + " | ".join(titles) + " |",
             "|---" * (len(FEATURES) + 3) + "|"]
    for family in FAMILIES:
        cells = ["✓" if family.applies(feature) else family.refused[feature] for feature in FEATURES]
        lines.append(f"| {family.name} | `{family.model_class}` | {traced_description(family)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.families", description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the family x feature table (Markdown)")
    args = parser.parse_args(argv)
    if args.table:
        print(feature_table(), end="")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
