"""Training FLOPs by the 6N rule (Kaplan et al. 2020, Sec. 2.1), with only the experts a token uses counted.

`6 * active_parameters * tokens` per step: non-embedding parameters, plus the output projection when it is
tied to the input embedding (its matmul still runs), with each mixture-of-experts layer's expert weights
scaled by `num_experts_per_tok / num_local_experts`. For an encoder-decoder the tokens are the encoder's
input tokens (an approximation). Attention's sequence-length term is left out, as in the 6N rule.
"""

from __future__ import annotations

from transformers import PreTrainedModel


def active_parameters(model: PreTrainedModel) -> int:
    """Parameters one token passes through in a forward pass (see module docstring)."""
    config = model.config
    active = model.num_parameters(exclude_embeddings=True)
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        active += model.get_output_embeddings().weight.numel()
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k and experts > top_k:
        expert_weights = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        active -= round(expert_weights * (1 - top_k / experts))
    return active



def training_flops(active: int, tokens: int) -> int:
    """FLOPs of one forward and backward pass of `tokens` tokens through `active` active parameters (6N)."""
    return 6 * active * tokens
