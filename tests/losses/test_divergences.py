"""KL, reverse KL, Jensen-Shannon and total variation against scipy, token masking, the num_items_in_batch
normaliser and the combined SinKD objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from workbench.losses import (
    causal_lm_mask,
    combine_losses,
    distillation_loss,
    divergence,
    kd_loss,
    sinkhorn_distance,
    token_sinkhorn,
)


def logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def probs(z: torch.Tensor, temperature: float) -> np.ndarray:
    return torch.softmax(z / temperature, -1).numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_scipy(temperature):
    zs, zt = logits(6, 7, seed=1), logits(6, 7, seed=2)
    s, t = probs(zs, temperature), probs(zt, temperature)
    m = (s + t) / 2
    expected = {
        "kl": rel_entr(t, s).sum(-1),
        "rkl": rel_entr(s, t).sum(-1),
        "js": 0.5 * rel_entr(t, m).sum(-1) + 0.5 * rel_entr(s, m).sum(-1),
        "tv": 0.5 * np.abs(s - t).sum(-1),
        "l1": np.abs(s - t).sum(-1),
        "soft_ce": -(t * np.log(s)).sum(-1),
    }
    for kind, values in expected.items():
        torch.testing.assert_close(divergence(zs, zt, kind, temperature), torch.from_numpy(values), rtol=1e-12,
                                   atol=1e-14, msg=kind)
        assert kd_loss(zs, zt, kind, temperature).item() == pytest.approx(values.mean(), rel=1e-12)


def test_zero_at_equal_distributions_and_bounds():
    z = logits(5, 9, seed=3)
    for kind in ("kl", "rkl", "js", "tv", "l1"):
        assert kd_loss(z, z.clone(), kind).abs().item() < 1e-12, kind
    disjoint_s = torch.tensor([[60.0, -60.0]], dtype=torch.float64)
    disjoint_t = disjoint_s.flip(-1)
    js = divergence(disjoint_s, disjoint_t, "js").item()
    assert js <= math.log(2) + 1e-15 and js == pytest.approx(math.log(2), rel=1e-12)  # the bound, reached
    assert divergence(disjoint_s, disjoint_t, "tv").item() == pytest.approx(1.0, rel=1e-6)
    zs, zt = logits(5, 9, seed=4), logits(5, 9, seed=5)
    entropy = -(torch.softmax(zt, -1) * torch.log_softmax(zt, -1)).sum(-1)
    torch.testing.assert_close(divergence(zs, zt, "soft_ce"), divergence(zs, zt, "kl") + entropy)  # official DistillKL


def test_tau_squared_and_teacher_detached():
    zs, zt = logits(4, 5, seed=6).requires_grad_(), logits(4, 5, seed=7).requires_grad_()
    plain = kd_loss(zs, zt, "kl", temperature=3.0)
    scaled = kd_loss(zs, zt, "kl", temperature=3.0, tau_squared=True)
    assert scaled.item() == pytest.approx(9 * plain.item(), rel=1e-12)
    scaled.backward()
    assert zs.grad is not None and zt.grad is None


def test_masking_counts_only_the_masked_positions():
    zs, zt = logits(3, 5, 8, seed=8).requires_grad_(), logits(3, 5, 8, seed=9)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    garbage = zs.detach().clone()
    garbage[~mask] = 1e4  # what is outside the mask never matters
    for kind in ("kl", "rkl", "js"):
        selected = divergence(zs[mask], zt[mask], kind)
        torch.testing.assert_close(kd_loss(zs, zt, kind, mask=mask), selected.mean())
        torch.testing.assert_close(kd_loss(garbage, zt, kind, mask=mask), selected.mean().detach())
        torch.testing.assert_close(kd_loss(zs, zt, kind, mask=mask, reduction="sum"), selected.sum())
        full = kd_loss(zs, zt, kind, mask=mask, reduction="none")
        assert full.shape == (3, 5) and (full[~mask] == 0).all()
    kd_loss(zs, zt, "kl", mask=mask).backward()
    assert (zs.grad[~mask] == 0).all() and (zs.grad[mask] != 0).any()
    empty = kd_loss(zs, zt, "kl", mask=torch.zeros(3, 5, dtype=torch.bool))
    assert empty.item() == 0


def test_num_items_in_batch_normalises_a_token_sum_across_micro_batches():
    """Two micro-batches, each normalised by the global token count, add up to the mean over the whole batch."""
    zs, zt = logits(4, 6, 10, seed=10), logits(4, 6, 10, seed=11)
    labels = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(1))
    labels[0, :4] = -100
    labels[3, 2:] = -100
    mask = causal_lm_mask(labels)
    total = int(mask.sum())
    for kind in ("kl", "js"):
        whole = kd_loss(zs, zt, kind, mask=mask)
        parts = sum(kd_loss(zs[i:i + 2], zt[i:i + 2], kind, mask=mask[i:i + 2], num_items_in_batch=total)
                    for i in (0, 2))
        torch.testing.assert_close(parts, whole)
        with_tensor = kd_loss(zs, zt, kind, mask=mask, num_items_in_batch=torch.tensor(total))
        torch.testing.assert_close(with_tensor, whole)
    whole = token_sinkhorn(zs, zt, mask)  # the Sinkhorn term is a token sum too
    parts = sum(token_sinkhorn(zs[i:i + 2], zt[i:i + 2], mask[i:i + 2], num_items_in_batch=total) for i in (0, 2))
    torch.testing.assert_close(parts, whole)


def test_vocabulary_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match="the student has 8 entries, the teacher 9"):
        kd_loss(logits(2, 3, 8), logits(2, 3, 9), "kl")
    with pytest.raises(ValueError, match="8 entries, the teacher 9"):
        distillation_loss(logits(2, 3, 8), logits(2, 3, 9), torch.tensor(1.0))


def test_unknown_kind_and_reduction():
    with pytest.raises(ValueError, match="kind must be one of"):
        kd_loss(logits(2, 3), logits(2, 3), "jsd")
    with pytest.raises(ValueError, match="reduction must be one of"):
        kd_loss(logits(2, 3), logits(2, 3), "kl", reduction="avg")


def test_combine_losses():
    ce, kd, sink = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5), torch.tensor(30.0)
    total, parts = combine_losses(ce, kd, sink, alpha=0.9, beta=8e-4)
    assert total.item() == pytest.approx(0.1 * 2.0 + 0.9 * 0.5 + 8e-4 * 30.0)
    assert set(parts) == {"ce", "kd", "sinkhorn"} and not parts["ce"].requires_grad
    total, parts = combine_losses(ce, None, sink, alpha=0.9, beta=0.01)  # no KD: CE keeps its full weight
    assert total.item() == pytest.approx(2.0 + 0.3) and set(parts) == {"ce", "sinkhorn"}


def test_classification_distillation_loss_is_the_paper_recipe():
    """(1 − α)·CE + α·KL_τ + β·N·⟨P, W⟩ over the N samples of a classification batch."""
    zs, zt = logits(32, 2, seed=12), logits(32, 2, seed=13)
    ce = torch.tensor(0.7, dtype=torch.float64)
    total, parts = distillation_loss(zs, zt, ce, temperature=3.0, alpha=0.8, beta=8e-4)
    kl = kd_loss(zs, zt, "kl", 3.0)
    sink = sinkhorn_distance(zs, zt, temperature=2.0)
    torch.testing.assert_close(total, 0.2 * ce + 0.8 * kl + 8e-4 * sink)
    torch.testing.assert_close(parts["sinkhorn"], sink)
    _, sample = distillation_loss(zs, zt, ce, scope="sample")  # the sample-wise variant: Σ_i ‖s_i − t_i‖₁
    s, t = torch.softmax(zs / 2, -1), torch.softmax(zt / 2, -1)
    torch.testing.assert_close(sample["sinkhorn"], (s - t).abs().sum())
    total, parts = distillation_loss(zs, zt, ce, kd="none", beta=0.0)
    assert total is ce and set(parts) == {"ce"}


@pytest.mark.parametrize("kind", ["kl", "rkl", "js", "l1"])
def test_chunked_rows_equal_one_pass_in_values_and_gradients(kind):
    """kd_loss turns `chunk_rows` rows into float32 at a time and recomputes them in the backward: the value and
    the gradient are those of the one-pass float64 computation (the rows are independent)."""
    zs, zt = logits(3, 7, 13, seed=12), logits(3, 7, 13, seed=13)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    expected_input = zs.clone().requires_grad_()
    expected = divergence(expected_input[mask], zt[mask], kind, 2.0).sum() / 11
    expected.backward()
    for chunk_rows in (1, 4, 1000):
        student = zs.clone().requires_grad_()
        value = kd_loss(student, zt, kind, 2.0, mask=mask, num_items_in_batch=11, chunk_rows=chunk_rows)
        value.backward()
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(student.grad, expected_input.grad, rtol=1e-12, atol=1e-15)


def test_bf16_token_logits_never_become_a_float32_tokens_by_vocabulary_tensor():
    from allocation_probe import LargestWideOutput

    generator = torch.Generator().manual_seed(3)
    zs = (torch.randn(2, 16, 300, generator=generator) * 3).bfloat16().requires_grad_()
    zt = (torch.randn(2, 16, 300, generator=generator) * 3).bfloat16()
    with LargestWideOutput() as probe:
        kd_loss(zs, zt, "js", 2.0, mask=torch.ones(2, 16, dtype=torch.bool), chunk_rows=4).backward()
    assert probe.largest <= 4 * 300  # one chunk of rows in float32, never 32 x 300
    assert zs.grad.dtype == torch.bfloat16 and zs.grad.abs().sum() > 0
