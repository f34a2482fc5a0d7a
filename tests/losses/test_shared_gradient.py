"""The causal-LM KD + top-k Sinkhorn path with one shared gradient buffer (`token_kd_and_sinkhorn`) against the
separate terms (`kd_loss` + `token_sinkhorn`), and its memory: one (R, V) gradient buffer, the teacher's logits
reused for it."""

import pytest
import torch

from workbench.losses import distill
from workbench.losses.distill import causal_lm_mask, distillation_loss, token_sinkhorn
from workbench.losses.divergences import kd_loss

OPTIONS = {"temperature": 2.0, "sinkhorn_temperature": 1.5, "alpha": 0.7, "beta": 0.3, "top_k": 5}


def case(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 7, 40, generator=generator, dtype=torch.float64).mul(3).to(dtype)
    teacher = torch.randn(3, 7, 40, generator=generator, dtype=torch.float64).mul(3).to(dtype)
    labels = torch.randint(0, 40, (3, 7), generator=generator)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return student, teacher, labels


def separate_terms(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kd: str, scope: str,
                   items: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The old path: the KD term and the Sinkhorn term, each with its own gradient."""
    kd_term = kd_loss(student, teacher, kd, OPTIONS["temperature"], mask, items, tau_squared=True)
    sink = token_sinkhorn(student, teacher, mask, scope=scope, temperature=OPTIONS["sinkhorn_temperature"],
                          top_k=OPTIONS["top_k"], num_items_in_batch=items)
    return kd_term, sink


@pytest.mark.parametrize("kd", ["kl", "rkl", "js"])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("items", [None, 50])
def test_shared_gradient_equals_the_separate_terms(kd: str, scope: str, items: int | None) -> None:
    student, teacher, labels = case()
    mask = causal_lm_mask(labels)
    ce = torch.tensor(1.25, dtype=torch.float64)
    kd_term, sink = separate_terms(student.requires_grad_(), teacher, mask, kd, scope, items)
    expected = (1 - OPTIONS["alpha"]) * ce + OPTIONS["alpha"] * kd_term + OPTIONS["beta"] * sink
    (expected_grad,) = torch.autograd.grad(expected, student)
    upstream = teacher.clone()
    total, parts = distillation_loss(student, upstream, ce, mask=mask, kd=kd, tau_squared=True, scope=scope,
                                     num_items_in_batch=items, overwrite_teacher=True, **OPTIONS)
    (grad,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["kd"], kd_term.detach())
    torch.testing.assert_close(parts["sinkhorn"], sink.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_teacher_logits_are_kept_unless_overwriting_is_allowed() -> None:
    student, teacher, labels = case(torch.float32)
    mask, ce = causal_lm_mask(labels), torch.tensor(1.0)
    given = teacher.clone()
    distillation_loss(student.requires_grad_(), given, ce, mask=mask, **OPTIONS)[0].backward()
    torch.testing.assert_close(given, teacher)  # overwrite_teacher=False: the caller's tensor is untouched
    grad_separate = student.grad.clone()
    student.grad = None
    distillation_loss(student, given, ce, mask=mask, overwrite_teacher=True, **OPTIONS)[0].backward()
    assert not torch.equal(given, teacher)  # its storage became the gradient buffer
    torch.testing.assert_close(student.grad, grad_separate)


def test_backward_makes_one_vocabulary_sized_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old path made two (R, V) gradients (KD's and Sinkhorn's), summed by autograd; the shared path makes
    none when it may overwrite the teacher's logits, and one otherwise."""
    student, teacher, labels = case(torch.float32)
    student.requires_grad_()
    mask, ce = causal_lm_mask(labels), torch.tensor(1.0)
    made = []
    for name in ("empty_like", "zeros_like"):
        original = getattr(torch, name)

        def counting(x: torch.Tensor, *args, original=original, name=name, **kwargs) -> torch.Tensor:
            if x.shape == (21, 40):
                made.append(name)
            return original(x, *args, **kwargs)

        monkeypatch.setattr(distill.torch, name, counting)
    grads = []
    for overwrite in (True, False):
        made.clear()
        distillation_loss(student, teacher.clone(), ce, mask=mask, overwrite_teacher=overwrite, **OPTIONS)[0].backward()
        grads.append(len(made))
    assert grads == [0, 1]


def test_bf16_gradient_stays_in_bf16_and_close() -> None:
    student, teacher, labels = case(torch.bfloat16)
    mask, ce = causal_lm_mask(labels), torch.tensor(1.0)
    reference = student.double().requires_grad_()
    distillation_loss(reference, teacher.double(), ce, mask=mask, **OPTIONS)[0].backward()
    student.requires_grad_()
    distillation_loss(student, teacher.clone(), ce, mask=mask, overwrite_teacher=True, **OPTIONS)[0].backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.double(), reference.grad, atol=2e-3, rtol=2e-2)


def test_bf16_builds_no_float32_vocabulary_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 logits: float32 temporaries stay chunk-sized (4 rows here), forward and backward."""
    from allocation_probe import LargestWideOutput

    from workbench.losses import divergences

    monkeypatch.setattr(divergences, "CHUNK_ELEMENTS", 4 * 40)
    student, teacher, labels = case(torch.bfloat16)
    student.requires_grad_()
    with LargestWideOutput() as probe:
        total, _ = distillation_loss(student, teacher, torch.tensor(1.0), mask=causal_lm_mask(labels),
                                     overwrite_teacher=True, **OPTIONS)
        total.backward()
    assert 0 < probe.largest <= 4 * 40
