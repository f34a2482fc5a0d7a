"""SeND / SenD: Sensitivity Dropout (Mohammadzadeh et al., "Hallucination Detox", arXiv 2410.15460, ACL 2025).

Hallucination metrics oscillate across checkpoints even after the loss settles. SeND tracks, on a split held out
of the training data, how each embedding index of one block's output moves between tracking points, and zeroes
the most variable ("sensitive") indices for the next stretch of training. Notation (v1 Algorithm 2, v4 §3; the
project's spec `docs/specs/send.md` §2.4 and its Corrections):

    (1) embedding of tracking text n at tracking point t, from hidden_states[layer] (default -2, the output of
        the penultimate block), attention-mask aware:
            e_n^t = ½ (mean_i h_i + h_last)          (`pooling: paper`, the paper's formula)
            e_n^t = mean_i h_i  or  h_last            (`pooling: mean | last`)
    (2) net change  Δe_{n,i}^t = |e_{n,i}^t − e_{n,i}^{t−1}|
    (3) sensitivity over the last C tracking points W = {T−C+1, …, T}, averaged over the N tracking texts
        (Algorithm 2, line 10):
            V_i = (1/N) Σ_n Var_{t∈W}(e_{n,i}^t) · Σ_{t∈W, t>T−C+1} Δe_{n,i}^t
        (population variance over the C points; the C−1 changes inside the window)
    (4) sensitive embedding indices: the top K% of V (default 20%, at least one index)
    (5) drop: for the next `drop_intervals` tracking intervals (T = 3), those indices of the tracked block's output
        are multiplied by 0 in the forward pass, in training mode only, without a 1/(1−p) rescale; then (3) and (4)
        are recomputed from the newest C points.

Tracking points are every `track_every` optimizer steps (default: every save, `save_steps`), taken at the end of
that step before the checkpoint is written, so a checkpoint holds the state that produced it. Ablations:
`selection: random` draws the same number of indices uniformly (the control of the paper's SEI-vs-random claim);
`selection: none` tracks without dropping (normal training on the same data split, the reference arm);
`site: mlp` zeroes the indices of the MLP output only (before the residual add); `site: weights` is the official
code's weight zeroing (rows i and i+d of GPT-NeoX's `dense_h_to_4h`, columns of `dense_4h_to_h`; Llama's
`gate_proj`/`up_proj` rows and `down_proj` columns), repeated at each tracking point of the drop: it zeroes MLP
*intermediate* units that merely share the residual indices' numbers, so it does not act on the tracked indices
(kept to reproduce the code, not the paper), and the weights regrow between points. It needs the dense MLP all run
long and trainable weights: beside SMoE-Dropout's experts, or under `model.lora`, it is a config error.

The paper's loop stops when the loss falls below ε or EES below δ (`while Loss > ε and EES > δ`); here
`stop_loss`/`stop_ees` do that, and by default the run keeps its fixed budget while `loss` and (with `ees_prompts`)
`send_ees`, the efficient EigenScore of K sampled continuations of tracking-text prefixes, are logged.

    methods:
      send: {top_percent: 20, window: 3, drop_intervals: 3, track_every: 25}

A tracking pass runs the model's decoder (`get_decoder()`, the blocks without the LM head: no logits are
computed) and a forward hook on the tracked block keeps that block's output alone (not every layer's hidden
states). Every rank runs the tracking passes (ZeRO-3 gathers weights in them) and rank 0's indices are broadcast
(on the backend's device, `workbench.collectives`), so all ranks drop the same indices. The tracking history,
the indices and the schedule position are method state, saved in every checkpoint: a resumed run continues
bit-equal to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.pytorch_utils import Conv1D

from workbench.collectives import broadcast_from
from workbench.distributed import full_parameter, link_master_copies, set_full_parameter
from workbench.errors import ConfigError
from workbench.methods import Method, register
from workbench.models.structure import LayerSites, model_sites, unwrapped

SELECTIONS = ("sensitive", "random", "none")
SITES = ("block", "mlp", "weights")
POOLINGS = ("paper", "mean", "last")


@dataclass
class SeNDConfig:
    top_percent: float = 20.0  # K: share of the embedding indices dropped, in (0, 100]
    window: int = 3  # C: tracking points the sensitivity is computed over (>= 2)
    drop_intervals: int = 3  # T: tracking intervals a drop lasts before the indices are recomputed
    track_every: int = 0  # optimizer steps between tracking points; 0: every save (`save_steps`)
    tracking_fraction: float = 0.1  # share of the training examples held out as tracking texts
    tracking_max: int = 64  # at most this many tracking texts (0: no cap)
    tracking_seed: int = 0  # the held-out split (the same in every arm and seed by default)
    tracking_batch_size: int = 16
    layer: int = -2  # hidden_states index of the tracked block output (-2: the penultimate block)
    pooling: Literal["paper", "mean", "last"] = "paper"  # ½(mean + last token), or one of them
    selection: Literal["sensitive", "random", "none"] = "sensitive"
    site: Literal["block", "mlp", "weights"] = "block"
    seed: int | None = None  # draws of `selection: random` and the EES samples; None: the run's seed
    stop_loss: float | None = None  # ε: stop once the logged training loss is below it
    stop_ees: float | None = None  # δ: stop once `send_ees` is below it (needs ees_prompts > 0)
    ees_prompts: int = 0  # tracking texts whose first half prompts the EES at each tracking point (0: none)
    ees_samples: int = 10  # K sampled continuations per EES prompt

    def __post_init__(self) -> None:
        if not 0 < self.top_percent <= 100:
            raise ValueError(f"top_percent must be in (0, 100], got {self.top_percent}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2 tracking points (a variance), got {self.window}")
        if self.drop_intervals < 1 or self.track_every < 0 or self.tracking_batch_size < 1:
            raise ValueError("drop_intervals and tracking_batch_size must be >= 1 and track_every >= 0")
        if not 0 < self.tracking_fraction < 1:
            raise ValueError(f"tracking_fraction must be in (0, 1), got {self.tracking_fraction}")
        for name, value, valid in (("selection", self.selection, SELECTIONS), ("site", self.site, SITES),
                                   ("pooling", self.pooling, POOLINGS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        if self.stop_ees is not None and self.ees_prompts < 1:
            raise ValueError("stop_ees needs ees_prompts >= 1 (the EES it compares is measured on those prompts)")
        if self.layer in (0, -1):
            raise ValueError("layer must index a block output that another block reads: not 0 (the embeddings) "
                             "or -1 (the final, normed output)")


# ----------------------------------------------------------------------------------------------------------
# The maths: pooled embeddings, sensitivity, selection
# ----------------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, d) hidden states -> (B, d) text embeddings over the attended tokens, eq. (1)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    last_index = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)  # last attended token
    last = hidden[torch.arange(hidden.shape[0]), last_index]
    return {"mean": mean, "last": last, "paper": 0.5 * (mean + last)}[pooling]


def sensitivity(history: torch.Tensor) -> torch.Tensor:
    """(C, N, d) embeddings at the last C tracking points -> (d,) V_i, eq. (3)."""
    variance = history.var(dim=0, unbiased=False)
    change = (history[1:] - history[:-1]).abs().sum(dim=0)
    return (variance * change).mean(dim=0)


def dropped_count(width: int, top_percent: float) -> int:
    """How many of `width` indices the top K% are (rounded, at least one)."""
    return max(1, min(width, round(width * top_percent / 100)))


def select_indices(scores: torch.Tensor, count: int, selection: str, generator: torch.Generator) -> torch.Tensor:
    """The `count` most sensitive indices (eq. 4), or `count` uniformly random ones; sorted."""
    if selection == "random":
        chosen = torch.randperm(scores.numel(), generator=generator)[:count]
    else:
        chosen = torch.topk(scores, count).indices
    return chosen.sort().values


# ----------------------------------------------------------------------------------------------------------
# The model side: which block, the forward hooks, the official weight zeroing
# ----------------------------------------------------------------------------------------------------------


def block_index(layer: int, num_blocks: int) -> int:
    """The block whose output is hidden_states[layer] (hidden_states[0] is the embedding output)."""
    position = layer if layer > 0 else num_blocks + 1 + layer
    if num_blocks < 2:
        raise ConfigError(f"method 'send' tracks the output of a block that another block reads: the model has "
                          f"{num_blocks} block (use at least 2)")
    if not 1 <= position <= num_blocks - 1:
        raise ConfigError(f"field 'methods.send.layer': {layer} is not the output of a block followed by another "
                          f"in a model of {num_blocks} blocks (valid: 1..{num_blocks - 1} or "
                          f"-{num_blocks}..-2)")
    return position - 1


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (the first element when it returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def tracking_trunk(model: nn.Module, block: nn.Module) -> nn.Module:
    """The part of `model` a tracking pass runs: its decoder (`get_decoder()`: embeddings and blocks, no LM
    head) when that holds the tracked `block`, else the whole model.

    Not a pass stopped at the tracked block (an exception from its hook): under ZeRO-3 that would leave the
    parameters DeepSpeed prefetched for the skipped modules gathered, and its module stack unbalanced. The
    decoder runs all its modules on every rank, and completes (DeepSpeed records its prefetch trace again at the
    next training step, as the pass left the model's own forward out)."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if isinstance(decoder, nn.Module) and any(module is block for module in decoder.modules()):
        return decoder
    return model


def _zero_indices(output: Any, indices: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (output[0].index_fill(-1, indices.to(output[0].device), 0), *output[1:])
    return output.index_fill(-1, indices.to(output.device), 0)


def mlp_weights(model: nn.Module, layer: LayerSites) -> list[tuple[nn.Parameter, int]]:
    """The tracked layer's dense MLP weights with the axis along which they hold intermediate units: rows of
    the up, gate or fused gate-up map, columns of the down map (transposed for transformers' Conv1D)."""
    if layer.mlp is None:
        raise ConfigError(f"field 'methods.send.site': 'weights' zeroes dense MLP units, and layer {layer.index} "
                          f"of {type(model).__name__} is a mixture of experts")
    owner = unwrapped(model)
    parts = [(name, 0) for name in (layer.mlp.up, layer.mlp.gate) if name] + [(layer.mlp.down, 1)]
    found = []
    for name, axis in parts:
        module = owner.get_submodule(name)
        found.append((module.weight, 1 - axis if isinstance(module, Conv1D) else axis))
    return found


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


@register("send")
class SeND(Method):
    Config = SeNDConfig
    uses_sites = True  # the tracked layer (and its MLP for site 'weights')
    logged_metrics = ("send_dropped", "send_tracking_points", "send_index_overlap", "send_tracking_seconds",
                      "send_ees")

    def __init__(self, config: SeNDConfig | None = None) -> None:
        super().__init__(config)
        self.history: list[torch.Tensor] = []  # (N, d) per tracking point, the newest last, at most `window`
        self.indices = torch.zeros(0, dtype=torch.long)  # dropped now (empty: no drop)
        self.remaining = 0  # tracking intervals left in the current drop
        self.points = 0  # tracking points taken
        self.selections = 0  # times the indices were (re)computed
        self.overlap = math.nan  # share of the new indices that were in the previous set
        self.tracking: list[list[int]] = []  # token ids of the tracking texts
        self.pad_id = 0
        self.tokenizer = None
        self.tracking_seconds = 0.0
        self.last_ees: float | None = None
        self.seed = self.config.seed or 0  # the run's seed where config.seed is None (set in `setup`)
        self._block: nn.Module | None = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the padded tracking texts
        self._hooked: nn.Module | None = None

    # --- what it needs of the model -------------------------------------------------------------------
    @classmethod
    def check_lora(cls, config: SeNDConfig, lora: dict[str, Any] | None) -> None:
        if lora is not None and config.site == "weights":
            raise ValueError("[methods.send.site] 'weights' zeroes MLP weights between updates, and under "
                             "model.lora those are frozen (they would never regrow, and the adapters still write "
                             "those units): use site 'block' or 'mlp' with LoRA")

    @classmethod
    def read_parts(cls, config: SeNDConfig) -> dict[str, str]:
        if config.site != "weights":
            return {}
        return {"mlp": "site 'weights' zeroes rows of the tracked block's dense MLP at every tracking point "
                       "(site 'block' or 'mlp' works beside it)"}

    # --- lifecycle hooks ---------------------------------------------------------------------------------
    @classmethod
    def check_sites(cls, config: SeNDConfig, sites: Any) -> None:
        index = block_index(config.layer, len(sites.layers))
        if config.site == "weights" and sites.layers[index].mlp is None:
            raise ValueError(f"site 'weights' zeroes dense MLP units, and layer {index + 1} is a mixture of experts")

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        sites = model_sites(model)
        index = block_index(self.config.layer, len(sites.layers))
        self._layer = sites.layers[index]
        self._block = self._layer.module
        self._model = model
        if self.config.site == "block":
            self._hooked = self._block
        elif self.config.site == "mlp":
            self._hooked = self._layer.feed_forward_branch
        else:
            mlp_weights(model, self._layer)  # checked now, used at tracking points
        where = {"block": "output", "mlp": "feed-forward branch output", "weights": "MLP units (weights)"}
        print(f"[send] tracking layer {index + 1} of {len(sites.layers)} output ({sites.hidden_size} indices), "
              f"dropping at its {where[self.config.site]}, selection {self.config.selection}")
        if self._hooked is not None:
            self._hooked.register_forward_hook(self._drop_hook)
        return model

    def _drop_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or len(self.indices) == 0:
            return output
        return _zero_indices(output, self.indices)

    def callbacks(self) -> list[TrainerCallback]:
        return [_TrackingCallback(self)]

    def setup(self, trainer: Trainer) -> None:
        """Hold the tracking split out of the training data (the same on every rank); take the run's seed for
        the random draws unless `seed` is given."""
        self.seed = self.config.seed if self.config.seed is not None else int(trainer.args.seed)
        dataset = trainer.train_dataset
        if dataset is None or not hasattr(dataset, "select") or "input_ids" not in dataset.column_names:
            raise ConfigError("method 'send' needs a map-style training dataset with input_ids to hold a tracking "
                              "split out of (a streamed or repeated dataset cannot be split)")
        n = len(dataset)
        count = max(1, round(n * self.config.tracking_fraction))
        if self.config.tracking_max:
            count = min(count, self.config.tracking_max)
        if n - count < 1:
            raise ConfigError(f"field 'methods.send.tracking_fraction': {n} training examples leave none to train "
                              f"on after {count} tracking texts")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.tracking_seed)).tolist()
        held = sorted(order[:count])
        self.tracking = [list(ids) for ids in dataset.select(held)["input_ids"]]
        self._batches = None
        trainer.train_dataset = dataset.select(sorted(order[count:]))
        self.tokenizer = trainer.processing_class
        self.pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0

    def state_dict(self) -> dict[str, Any]:
        history = torch.stack(self.history) if self.history else torch.zeros(0)
        return {"history": history, "indices": self.indices.clone(), "remaining": self.remaining,
                "points": self.points, "selections": self.selections, "overlap": self.overlap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"].unbind(0)) if state["history"].numel() else []
        self.indices = state["indices"].long()
        self.remaining, self.points = int(state["remaining"]), int(state["points"])
        self.selections, self.overlap = int(state["selections"]), float(state["overlap"])

    # --- tracking --------------------------------------------------------------------------------------
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The tracking texts as right-padded (input_ids, attention_mask) batches (built once)."""
        if self._batches is None:
            self._batches = self._pad_tracking_texts()
        return self._batches

    def _pad_tracking_texts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        size, out = self.config.tracking_batch_size, []
        for start in range(0, len(self.tracking), size):
            chunk = self.tracking[start:start + size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, tokens in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            out.append((ids, mask))
        return out

    @torch.no_grad()
    def embed(self, model: nn.Module) -> torch.Tensor:
        """(N, d) float64 embeddings of the tracking texts, eq. (1), in eval mode (no drop, no dropout): the
        tracked block's output, caught by a forward hook, from a pass through the decoder alone (no LM head)."""
        if self._block is None:
            raise RuntimeError("SeND.embed needs prepare_model(model) first (it finds the tracked block)")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        trunk = tracking_trunk(model, self._block)
        caught: dict[str, torch.Tensor] = {}
        handle = self._block.register_forward_hook(
            lambda module, args, output: caught.update(out=block_output(output)))
        pooled = []
        try:
            for ids, mask in self.batches():
                trunk(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                if "out" not in caught:
                    raise RuntimeError("SeND: the tracked block did not run in the tracking pass (was it replaced "
                                       "after prepare_model?)")
                pooled.append(pool(caught.pop("out").float(), mask.to(device), self.config.pooling).double().cpu())
        finally:
            handle.remove()
            model.train(was_training)
        return torch.cat(pooled)

    def track(self, model: nn.Module) -> None:
        """One tracking point: embed, then start a new drop when the last one has run out (eqs. 2-5)."""
        started = time.perf_counter()
        self.history = [*self.history, self.embed(model)][-self.config.window:]
        self.points += 1
        self.remaining = max(0, self.remaining - 1)
        if self.remaining == 0:
            self.indices = torch.zeros(0, dtype=torch.long)
            if self.config.selection != "none" and len(self.history) == self.config.window:
                self.choose()
        if self.config.site == "weights" and len(self.indices):
            self.zero_weights()
        self.tracking_seconds = time.perf_counter() - started

    def choose(self) -> None:
        scores = sensitivity(torch.stack(self.history))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.selections)
        chosen = select_indices(scores, dropped_count(scores.numel(), self.config.top_percent),
                                self.config.selection, generator)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            chosen = broadcast_from(chosen, source=0)  # one set of indices on every rank
        previous = set(self.indices.tolist()) if len(self.indices) else None
        self.overlap = len(previous & set(chosen.tolist())) / len(chosen) if previous is not None else math.nan
        self.indices, self.remaining = chosen, self.config.drop_intervals
        self.selections += 1

    def zero_weights(self) -> None:
        """The official code's drop: zero the MLP units numbered like the indices (and +d_model for GPT-NeoX's
        4·d intermediate width), in the optimizer's copy too (`workbench.distributed`); every rank calls it."""
        width = self.history[-1].shape[1]
        for weight, axis in mlp_weights(self._model, self._layer):
            value = full_parameter(weight)
            units = value.shape[axis]
            numbers = torch.cat([self.indices, self.indices + width]) if units >= 2 * width else self.indices
            value.index_fill_(axis, numbers[numbers < units], 0.0)
            set_full_parameter(weight, value)

    def ees(self, model: nn.Module) -> float:
        """Mean EES over the first `ees_prompts` tracking texts' first halves (K sampled continuations each)."""
        from workbench.metrics.hallucination import EigenScoreConfig, eigenscore_report

        texts = [self.tokenizer.decode(ids[: max(1, len(ids) // 2)], skip_special_tokens=True)
                 for ids in self.tracking[: self.config.ees_prompts]]
        config = EigenScoreConfig(samples=self.config.ees_samples, exact=False, seed=self.seed)
        return float(eigenscore_report(model, self.tokenizer, texts, config)["ees"])


class _TrackingCallback(TrainerCallback):
    """Takes SeND's tracking points at the end of their steps, logs the method's state, applies the stop rule."""

    adds_metrics = True

    def __init__(self, method: SeND) -> None:
        self.method = method

    def every(self, state) -> int:
        every = self.method.config.track_every or state.save_steps
        if not every:
            raise ConfigError("method 'send': set methods.send.track_every, or save by steps (training.save_steps)")
        return int(every)

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        """`site: weights` writes the weights' master copies: under fp16 at ZeRO-0 DeepSpeed's optimizer keeps
        them apart from the model, linked here (`workbench.distributed.link_master_copies`)."""
        if self.method.config.site == "weights":
            link_master_copies(kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        if model is None or state.global_step % self.every(state) != 0:
            return
        self.method.track(model)
        if self.method.config.ees_prompts:
            self.method.last_ees = self.method.ees(model)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return
        method, config = self.method, self.method.config
        logs.update(send_dropped=len(method.indices), send_tracking_points=method.points,
                    send_tracking_seconds=method.tracking_seconds)
        if not math.isnan(method.overlap):
            logs["send_index_overlap"] = method.overlap
        if method.last_ees is not None:
            logs["send_ees"] = method.last_ees
        reasons = []
        if config.stop_loss is not None and logs["loss"] < config.stop_loss:
            reasons.append(f"loss {logs['loss']:.4g} < stop_loss {config.stop_loss}")
        if config.stop_ees is not None and method.last_ees is not None and method.last_ees < config.stop_ees:
            reasons.append(f"EES {method.last_ees:.4g} < stop_ees {config.stop_ees}")
        if reasons:
            if state.is_world_process_zero:
                print(f"[workbench] send: stopping at step {state.global_step}: {'; '.join(reasons)}")
            control.should_training_stop = True
