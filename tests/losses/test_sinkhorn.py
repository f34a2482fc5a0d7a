"""The batch-wise Sinkhorn distance against POT, its numerics and gradients, the causal-LM scopes, and the
`sinkd` method's loss hook on a tiny GPT-NeoX student and teacher."""

from __future__ import annotations

import json

import numpy as np
import ot
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

from workbench.checkpoints import write_manifest
from workbench.errors import ConfigError
from workbench.losses import (
    causal_lm_mask,
    distillation_loss,
    l1_cdist,
    sinkhorn_cost,
    sinkhorn_distance,
    token_sinkhorn,
    transport_plan,
    truncate_vocabulary,
)
from workbench.methods import build_methods, validate_method_config


def logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def pot_value(zs: torch.Tensor, zt: torch.Tensor, epsilon: float, method: str = "sinkhorn",
              temperature: float = 2.0) -> float:
    """N-free POT value: ot.sinkhorn2 with a = b = 1/N on the cityblock cost, converged (its log['err'] checked)."""
    s = torch.softmax(zs / temperature, -1).numpy()
    t = torch.softmax(zt / temperature, -1).numpy()
    cost = ot.dist(s, t, metric="cityblock")
    a = np.ones(len(s)) / len(s)
    value, log = ot.sinkhorn2(a, a, cost, epsilon, method=method, numItermax=100_000, stopThr=1e-12, log=True)
    assert log["err"][-1] < 1e-10  # POT is silent on non-convergence
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# Against POT
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pot_sinkhorn2_when_converged(seed, log_domain):
    zs, zt = logits(8, 5, seed=seed), logits(8, 5, seed=seed + 100)
    reference = pot_value(zs, zt, 0.1, "sinkhorn_log" if log_domain else "sinkhorn")
    mean = sinkhorn_distance(zs, zt, epsilon=0.1, iterations=1000, scaling="mean", log_domain=log_domain)
    total = sinkhorn_distance(zs, zt, epsilon=0.1, iterations=1000, scaling="sum", log_domain=log_domain)
    assert mean.item() == pytest.approx(reference, rel=1e-9)
    assert total.item() == pytest.approx(8 * reference, rel=1e-9)  # the official doubly stochastic plan: N x POT


def test_small_epsilon_matches_pot_log_and_approaches_emd():
    zs, zt = logits(8, 5, seed=3), logits(8, 5, seed=103)  # POT converges in ~2300 iterations here
    reference = pot_value(zs, zt, 0.01, "sinkhorn_log")
    ours = sinkhorn_distance(zs, zt, epsilon=0.01, iterations=3000, scaling="mean", log_domain=True).item()
    assert ours == pytest.approx(reference, rel=1e-6)
    s, t = torch.softmax(zs / 2, -1).numpy(), torch.softmax(zt / 2, -1).numpy()
    emd = ot.emd2(np.ones(8) / 8, np.ones(8) / 8, ot.dist(s, t, metric="cityblock"))  # exact OT
    assert 0 < ours - emd < 5e-3 * emd  # entropic cost above the exact one, and close to it at small epsilon


@pytest.mark.parametrize("log_domain", [False, True])
def test_golden_pot_value(log_domain):
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert ot.sinkhorn2([0.5, 0.5], [0.5, 0.5], cost.numpy(), 1) == pytest.approx(0.26894142, abs=1e-8)
    value = sinkhorn_cost(cost, 1.0, 1000, scaling="mean", log_domain=log_domain)
    assert value.item() == pytest.approx(0.26894142, abs=1e-8)
    total = sinkhorn_cost(cost, 1.0, 1000, scaling="sum", log_domain=log_domain)
    assert total.item() == pytest.approx(2 * 0.26894142, abs=2e-8)


def test_twenty_iterations_are_within_1e_2_of_converged_at_epsilon_0_1():
    """At ε = 0.1, τ_S = 2, N = 8, C = 5 and logits of scale 3 (peaked enough that 20 steps are visibly short of
    convergence), 20 iterations stay within 1e-2 relative of 1000; at ε = 0.01 they do not."""
    errors, small_eps_errors = [], []
    for seed in range(10):
        zs, zt = logits(8, 5, seed=seed), logits(8, 5, seed=seed + 50)
        short = sinkhorn_distance(zs, zt, epsilon=0.1, iterations=20).item()
        converged = sinkhorn_distance(zs, zt, epsilon=0.1, iterations=1000).item()
        errors.append(abs(short - converged) / converged)
        short = sinkhorn_distance(zs, zt, epsilon=0.01, iterations=20).item()
        converged = sinkhorn_distance(zs, zt, epsilon=0.01, iterations=1000).item()
        small_eps_errors.append(abs(short - converged) / converged)
    assert max(errors) < 1e-2
    assert max(errors) > 1e-5  # not trivially converged: the tolerance is doing work
    assert max(small_eps_errors) > 1e-2


def test_marginals():
    cost = l1_cdist(torch.softmax(logits(8, 5, seed=3) / 2, -1), torch.softmax(logits(8, 5, seed=4) / 2, -1))
    converged = 8 * transport_plan(cost, 0.1, 1000)  # x N: the official doubly stochastic plan
    torch.testing.assert_close(converged.sum(0), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(converged.sum(1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-10)
    short = 8 * transport_plan(cost, 0.1, 20)  # the column step is the last one: exact columns only
    torch.testing.assert_close(short.sum(0), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_permutation_invariance_and_floor():
    zs, zt = logits(16, 5, seed=5), logits(16, 5, seed=6)
    value = sinkhorn_distance(zs, zt)
    permuted = sinkhorn_distance(zs[torch.randperm(16, generator=torch.Generator().manual_seed(0))], zt)
    torch.testing.assert_close(permuted, value, rtol=1e-12, atol=0)
    # a set-to-set distance with a diffuse plan: non-zero when student equals teacher, below a random student's
    floor = sinkhorn_distance(zt.clone(), zt)
    assert 0 < floor < value


@pytest.mark.parametrize("log_domain", [False, True])
def test_gradcheck_through_the_iterations(log_domain):
    zs = logits(4, 3, seed=7).requires_grad_()
    zt = logits(4, 3, seed=8).requires_grad_()  # random, distinct: |.| is not differentiable at s = t
    assert torch.autograd.gradcheck(lambda z: sinkhorn_distance(z, zt, log_domain=log_domain), (zs,))
    sinkhorn_distance(zs, zt, log_domain=log_domain).backward()
    assert zs.grad is not None and zt.grad is None  # the teacher is detached


@pytest.mark.parametrize("epsilon", [0.5, 0.1, 0.05])
def test_log_domain_equals_kernel_domain_where_both_are_stable(epsilon):
    zs, zt = logits(8, 5, seed=9).requires_grad_(), logits(8, 5, seed=10)
    kernel = sinkhorn_distance(zs, zt, epsilon=epsilon, log_domain=False)
    (grad_kernel,) = torch.autograd.grad(kernel, zs)
    log = sinkhorn_distance(zs, zt, epsilon=epsilon, log_domain=True)
    (grad_log,) = torch.autograd.grad(log, zs)
    torch.testing.assert_close(log, kernel, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_log, grad_kernel, rtol=1e-8, atol=1e-12)


def test_log_domain_stays_finite_where_the_kernel_underflows():
    zs, zt = logits(16, 5, seed=0, dtype=torch.float32), logits(16, 5, seed=1, dtype=torch.float32)
    reference = sinkhorn_distance(zs.double(), zt.double(), epsilon=0.002, iterations=50, log_domain=True)
    kernel = sinkhorn_distance(zs, zt, epsilon=0.002, iterations=50, log_domain=False)
    log = sinkhorn_distance(zs, zt, epsilon=0.002, iterations=50, log_domain=True)
    assert not torch.isfinite(kernel)  # exp(-W/ε) flushes whole rows to 0 in float32
    assert log.dtype == torch.float32 and log.item() == pytest.approx(reference.item(), rel=1e-4)
    assert sinkhorn_distance(zs, zt, epsilon=0.002, iterations=50).item() == log.item()  # auto: log domain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    zs, zt = logits(16, 5, seed=2, dtype=dtype).requires_grad_(), logits(16, 5, seed=3, dtype=dtype)
    value = sinkhorn_distance(zs, zt)  # auto: log domain, float32
    upcast = sinkhorn_distance(zs.detach().float(), zt.float(), log_domain=True)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(upcast.item(), rel=1e-6)
    value.backward()
    assert zs.grad.dtype == dtype and torch.isfinite(zs.grad.float()).all()


# ----------------------------------------------------------------------------------------------------------
# The L1 cost and padded batches of problems
# ----------------------------------------------------------------------------------------------------------


def test_chunked_l1_cdist_matches_torch_and_gradchecks():
    x, y = logits(2, 5, 7, seed=11).requires_grad_(), logits(2, 6, 7, seed=12).requires_grad_()
    weights = logits(2, 5, 6, seed=13)
    chunked = l1_cdist(x, y, max_elements=2 * 6 * 7 * 2, chunked=True)  # two rows per chunk: three chunks
    reference = torch.cdist(x, y, p=1)
    torch.testing.assert_close(chunked, reference)
    grads = torch.autograd.grad((chunked * weights).sum(), (x, y))
    expected = torch.autograd.grad((reference * weights).sum(), (x, y))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, b: l1_cdist(a, b, max_elements=84, chunked=True), (x, y))


@pytest.mark.parametrize("log_domain", [False, True])
def test_padded_problems_equal_separate_ones(log_domain):
    costs = l1_cdist(torch.softmax(logits(3, 6, 5, seed=14), -1), torch.softmax(logits(3, 6, 5, seed=15), -1))
    sizes = [6, 4, 1]
    mask = torch.arange(6)[None, :] < torch.tensor(sizes)[:, None]
    costs.requires_grad_()
    batched = sinkhorn_cost(costs, log_domain=log_domain, row_mask=mask, col_mask=mask)
    (grad,) = torch.autograd.grad(batched.sum(), costs)
    assert torch.isfinite(grad).all() and (grad[1, 4:] == 0).all() and (grad[2, :, 1:] == 0).all()  # padding: none
    costs = costs.detach()
    unpadded = sinkhorn_cost(costs, log_domain=log_domain)  # every problem 6 x 6
    for b, n in enumerate(sizes):
        alone = sinkhorn_cost(costs[b, :n, :n], log_domain=log_domain)
        torch.testing.assert_close(batched[b], alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(unpadded[b], sinkhorn_cost(costs[b], log_domain=log_domain), rtol=1e-12, atol=0)
    rectangular = l1_cdist(torch.softmax(logits(5, 4, seed=16), -1), torch.softmax(logits(3, 4, seed=17), -1))
    masked = sinkhorn_cost(rectangular, 0.1, 500, scaling="mean", log_domain=log_domain,
                           row_mask=torch.ones(5, dtype=torch.bool))  # the masked code path, same problem
    assert sinkhorn_cost(rectangular, 0.1, 500, scaling="mean", log_domain=log_domain).item() == pytest.approx(
        ot.sinkhorn2(np.ones(5) / 5, np.ones(3) / 3, rectangular.numpy(), 0.1, stopThr=1e-13), rel=1e-9)
    torch.testing.assert_close(masked, sinkhorn_cost(rectangular, 0.1, 500, scaling="mean", log_domain=log_domain))


# ----------------------------------------------------------------------------------------------------------
# Causal LMs: per-sequence, flattened batch, sample-wise; top-k; vocabulary mismatch
# ----------------------------------------------------------------------------------------------------------


def lm_batch(seed: int = 0, vocab: int = 11):
    student, teacher = logits(3, 9, vocab, seed=seed), logits(3, 9, vocab, seed=seed + 1)
    labels = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(seed))
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[2, :6] = -100
    return student, teacher, labels, causal_lm_mask(labels)


def test_causal_lm_mask_is_the_shifted_label_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert causal_lm_mask(labels).tolist() == [[False, True, True, False, False]]
    assert causal_lm_mask(shift_labels=labels).tolist() == [[False, False, True, True, False]]


@pytest.mark.parametrize("log_domain", [False, True])
def test_sequence_scope_equals_a_loop_over_sequences(log_domain):
    student, teacher, _, mask = lm_batch()
    value = token_sinkhorn(student, teacher, mask, log_domain=log_domain)
    loop = sum(sinkhorn_distance(student[b][mask[b]], teacher[b][mask[b]], log_domain=log_domain) for b in range(3))
    torch.testing.assert_close(value, loop / mask.sum(), rtol=1e-10, atol=0)  # sum over tokens / tokens
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, log_domain=log_domain, num_items_in_batch=40),
                               loop / 40, rtol=1e-10, atol=0)
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, log_domain=log_domain, reduction="sum"),
                               loop, rtol=1e-10, atol=0)


def test_padding_free_sequences_equal_separate_rows():
    student, teacher, _, mask = lm_batch(seed=3)
    rows = token_sinkhorn(student, teacher, mask, reduction="sum")
    flat = token_sinkhorn(student.reshape(1, 27, -1), teacher.reshape(1, 27, -1), mask.reshape(1, 27),
                          sequences=torch.arange(3).repeat_interleave(9)[None], reduction="sum")
    torch.testing.assert_close(flat, rows, rtol=1e-12, atol=0)


def test_batch_and_sample_scopes():
    student, teacher, _, mask = lm_batch(seed=5)
    flat = sinkhorn_distance(student[mask], teacher[mask], scaling="sum")
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, scope="batch"), flat / mask.sum())
    s, t = torch.softmax(student[mask] / 2, -1), torch.softmax(teacher[mask] / 2, -1)
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, scope="sample"), (s - t).abs().sum(-1).mean())


def test_top_k_truncation():
    student, teacher, _, mask = lm_batch(seed=7, vocab=40)
    full = token_sinkhorn(student, teacher, mask, scope="batch")
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, scope="batch", top_k=39), full)
    # top 5 entries by teacher mass over the counted tokens, plus the rest of the mass: by hand
    s, t = torch.softmax(student[mask] / 2, -1), torch.softmax(teacher[mask] / 2, -1)
    keep = t.sum(0).topk(5).indices
    s5, t5 = (torch.cat([p[:, keep], 1 - p[:, keep].sum(-1, keepdim=True)], -1) for p in (s, t))
    by_hand = sinkhorn_cost(torch.cdist(s5, t5, p=1)) / mask.sum()
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask, scope="batch", top_k=5), by_hand)
    assert (l1_cdist(*truncate_vocabulary(s, t, 5)) <= torch.cdist(s, t, p=1) + 1e-12).all()  # a lower bound
    per_sequence = token_sinkhorn(student, teacher, mask, top_k=5)  # each sequence keeps its own top 5
    loop = 0
    for b in range(3):
        sb, tb = truncate_vocabulary(torch.softmax(student[b][mask[b]] / 2, -1),
                                     torch.softmax(teacher[b][mask[b]] / 2, -1), 5)
        loop = loop + sinkhorn_cost(torch.cdist(sb, tb, p=1))
    torch.testing.assert_close(per_sequence, loop / mask.sum())


def truncated_by_probabilities(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, top_k: int,
                               scope: str) -> torch.Tensor:
    """The top-k Sinkhorn term from full-vocabulary softmaxes cut by `truncate_vocabulary` (the old path)."""
    problems = [mask] if scope == "batch" else [mask & (torch.arange(3)[:, None] == b) for b in range(3)]
    total = 0
    for rows in problems:
        s, t = (torch.softmax(z[rows] / 2, -1) for z in (student, teacher))
        total = total + sinkhorn_cost(l1_cdist(*truncate_vocabulary(s, t, top_k)))
    return total / mask.sum()


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_top_k_from_logits_equals_truncating_full_softmaxes_in_values_and_gradients(scope):
    student, teacher, _, mask = lm_batch(seed=9, vocab=40)
    expected_input = student.clone().requires_grad_()
    expected = truncated_by_probabilities(expected_input, teacher, mask, 6, scope)
    expected.backward()
    for chunk_rows in (2, 1000):
        direct = student.clone().requires_grad_()
        value = token_sinkhorn(direct, teacher, mask, scope=scope, top_k=6, chunk_rows=chunk_rows)
        value.backward()
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(direct.grad, expected_input.grad, rtol=1e-8, atol=1e-12)


def test_top_k_auto_keeps_small_vocabularies_whole_and_cuts_large_ones_to_50():
    from workbench.losses.distill import AUTO_TOP_K, FULL_VOCABULARY_UP_TO, resolve_top_k

    assert resolve_top_k("auto", FULL_VOCABULARY_UP_TO) is None
    assert resolve_top_k("auto", FULL_VOCABULARY_UP_TO + 1) == AUTO_TOP_K == 50
    assert resolve_top_k(None, 200_000) is None and resolve_top_k(7, 11) == 7
    with pytest.raises(ValueError, match="top_k"):
        resolve_top_k(0, 11)
    student, teacher, _, mask = lm_batch(seed=4, vocab=40)
    torch.testing.assert_close(token_sinkhorn(student, teacher, mask), token_sinkhorn(student, teacher, mask,
                                                                                       top_k=None))
    assert validate_method_config("sinkd", {"teacher": "t"})["top_k"] == "auto"
    with pytest.raises(ValueError, match=r"\[sinkd"):
        validate_method_config("sinkd", {"teacher": "t", "top_k": 0})


def test_top_k_on_bf16_logits_never_builds_a_float32_tokens_by_vocabulary_tensor():
    from allocation_probe import LargestWideOutput

    generator = torch.Generator().manual_seed(5)
    student = (torch.randn(2, 16, 300, generator=generator) * 3).bfloat16().requires_grad_()
    teacher = (torch.randn(2, 16, 300, generator=generator) * 3).bfloat16()
    with LargestWideOutput() as probe:
        token_sinkhorn(student, teacher, top_k=5, chunk_rows=4).backward()
    assert probe.largest <= 4 * 300  # chunks of 4 rows, the (2 x 300) teacher mass, (16 x 16) costs: not 32 x 300
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0


def test_vocabulary_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match="11 entries, the teacher 12"):
        sinkhorn_distance(logits(4, 11), logits(4, 12))
    with pytest.raises(ValueError, match="11 entries, the teacher 12"):
        token_sinkhorn(logits(2, 3, 11), logits(2, 3, 12))


def test_nothing_counted_is_zero_with_a_graph():
    student = logits(2, 4, 6).requires_grad_()
    value = token_sinkhorn(student, logits(2, 4, 6, seed=1), torch.zeros(2, 4, dtype=torch.bool))
    value.backward()
    assert value.item() == 0 and (student.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------
# The method: config, teacher loading and preparation, the loss hook
# ----------------------------------------------------------------------------------------------------------


def tiny_neox(seed: int, vocab: int = 64) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config)


def test_config_validation():
    assert validate_method_config("sinkd", {"teacher": "t"})["beta"] == 8e-4
    with pytest.raises(ValueError, match=r"\[sinkd.teacher\]"):
        validate_method_config("sinkd", {})
    with pytest.raises(ValueError, match=r"\[sinkd.kd\]"):
        validate_method_config("sinkd", {"teacher": "t", "kd": "jsd"})
    with pytest.raises(ValueError, match="alpha"):
        validate_method_config("sinkd", {"teacher": "t", "alpha": 1.5})


def test_loss_hook_trains_the_student_and_never_the_teacher(tmp_path):
    tiny_neox(1).save_pretrained(tmp_path / "teacher")
    student = tiny_neox(2)
    [method] = build_methods({"sinkd": {"teacher": str(tmp_path / "teacher"), "beta": 0.1}})
    trainer = Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                             use_cpu=True, gradient_accumulation_steps=2))
    method.setup(trainer)
    teacher = method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}

    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    student.train()
    outputs = student(**inputs)
    loss = method.loss(student, inputs, outputs, outputs.loss, None)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    expected, parts = distillation_loss(outputs.logits, teacher_logits, outputs.loss, mask=causal_lm_mask(labels),
                                        beta=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # logged parts: per-micro-batch means divided by the accumulation steps, averaged over the steps since the last log
    metrics = method.metrics(global_step=1)
    assert set(metrics) == set(method.logged_metrics)
    assert metrics["sinkd_sinkhorn"] == pytest.approx(parts["sinkhorn"].item() / 2)


def test_teacher_from_a_run_folder_and_vocabulary_check(tmp_path):
    run = tmp_path / "runs" / "teacher"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "config.yaml").write_text("name: teacher\n")
    tiny_neox(1, vocab=48).save_pretrained(run / "checkpoint-4")
    write_manifest(run / "checkpoint-4", 4)
    (run / "checkpoint-8").mkdir()  # newer but incomplete: skipped
    (run / "checkpoint-8" / "config.json").write_text(json.dumps({}))
    [method] = build_methods({"sinkd": {"teacher": str(run)}})
    trainer = Trainer(model=tiny_neox(2), args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                                  use_cpu=True))
    with pytest.raises(ConfigError, match="48 entries and the student 64"):
        method.setup(trainer)
    [missing] = build_methods({"sinkd": {"teacher": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="not found"):
        missing.setup(trainer)


def test_half_precision_teacher_and_padding_free_sequences(tmp_path):
    from workbench.methods.sinkd import sequence_ids

    tiny_neox(1).save_pretrained(tmp_path / "teacher")
    student = tiny_neox(2)
    [method] = build_methods({"sinkd": {"teacher": str(tmp_path / "teacher"), "teacher_dtype": "bfloat16"}})
    method.setup(Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                               use_cpu=True)))
    assert {p.dtype for p in method.teacher.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    labels = ids.clone()
    labels[0, [0, 4, 7]] = -100
    inputs = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    mask = causal_lm_mask(labels)
    assert sequence_ids(mask, inputs).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]]
    assert sequence_ids(mask, {**inputs, "attention_mask": torch.ones_like(ids)}) is None
    outputs = student(**inputs)
    loss = method.loss(student, inputs, outputs, outputs.loss, torch.tensor(7))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert student.gpt_neox.embed_in.weight.grad is not None


def test_teacher_dtype_and_device_follow_the_run():
    from types import SimpleNamespace

    import transformers.integrations

    from workbench.methods.sinkd import teacher_device_map, teacher_dtype

    assert teacher_dtype(None, SimpleNamespace(bf16=True, fp16=False)) == torch.bfloat16
    assert teacher_dtype(None, SimpleNamespace(bf16=False, fp16=True)) == torch.float16
    assert teacher_dtype(None, SimpleNamespace(bf16=False, fp16=False)) == torch.float32
    assert teacher_dtype("float16", SimpleNamespace(bf16=True, fp16=False)) == torch.float16  # the config wins
    assert teacher_dtype("auto", SimpleNamespace(bf16=True, fp16=False)) == "auto"  # as saved
    args = SimpleNamespace(device=torch.device("cuda", 3))
    assert teacher_device_map(args) == "cuda:3"  # straight onto this rank's device
    original = transformers.integrations.is_deepspeed_zero3_enabled
    try:
        transformers.integrations.is_deepspeed_zero3_enabled = lambda: True
        assert teacher_device_map(args) is None  # ZeRO-3: zero.Init partitions it while loading
    finally:
        transformers.integrations.is_deepspeed_zero3_enabled = original


@pytest.mark.parametrize("bf16", [False, True])
def test_teacher_loads_in_the_training_dtype_not_the_saved_one(tmp_path, bf16):
    tiny_neox(1).to(torch.float16).save_pretrained(tmp_path / "teacher")  # saved in neither training dtype
    [method] = build_methods({"sinkd": {"teacher": str(tmp_path / "teacher")}})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=bf16)
    method.setup(Trainer(model=tiny_neox(2), args=args))
    expected = torch.bfloat16 if bf16 else torch.float32
    assert {(p.dtype, p.device) for p in method.teacher.parameters()} == {(expected, args.device)}
