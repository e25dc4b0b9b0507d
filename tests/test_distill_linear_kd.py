"""The Distiller's fused logit path (``logit_kd_backend="fused"``): the student's output projection
computes the task and logit terms from its input through ``flexkd.ops.linear_logit_kd``. It must give
the materialised path's terms and gradients, take a top-K teacher the same way, honour or refuse what
runs after the head, and never make the logits in a step."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from _tiny_hf import _decoder_kwargs, build, padded_batch

from flexkd.distill import Distiller
from flexkd.losses import logit_kd

# The KD terms are differences of entropies of size ~log V summed in fp32 over the batch's positions, so
# two fp32 implementations agree to a few 1e-7 absolute (relative to the terms' size, not the result's).
TERM_ATOL, TERM_RTOL = 2e-6, 1e-5
GRAD_RTOL = 1e-4


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = build(name)
    torch.manual_seed(seed + 1)
    return teacher, build(name)


def _batch():
    batch = padded_batch(3, 9, generator=torch.Generator().manual_seed(5))
    batch["labels"][:, :2] = -100  # a prompt
    return batch


def _terms_and_grads(teacher, student, backend, **options):
    torch.manual_seed(7)  # the same projector on both paths
    distiller = Distiller(teacher, student, logit_kd_backend=backend, **options)
    distiller.eval()
    student.zero_grad(set_to_none=True)
    loss, terms = distiller(_batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return distiller, terms, grads


def _assert_same(fused, materialised):
    (_, terms_f, grads_f), (_, terms_m, grads_m) = fused, materialised
    for name in ("task", "logit", "feature", "total"):
        torch.testing.assert_close(terms_f[name], terms_m[name], rtol=TERM_RTOL, atol=TERM_ATOL)
    assert grads_f.keys() == grads_m.keys()
    for name, g in grads_f.items():
        scale = grads_m[name].abs().max().item()
        torch.testing.assert_close(g, grads_m[name], rtol=GRAD_RTOL, atol=GRAD_RTOL * scale + 1e-12)


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # GPT-2: tied embeddings; this Llama: untied
@pytest.mark.parametrize(
    ("kind", "feature"), [("forward_kl", "none"), ("jsd", "projector"), ("reverse_kl", "none")]
)
def test_fused_terms_and_grads_equal_the_materialised_path(name, kind, feature):
    teacher, student = _pair(name)
    options = dict(
        feature=feature,
        weights={"task": 1.0, "logit": 0.7, "feature": 0.5},
        logit_kind=kind,
        temperature=2.0,
    )
    fused = _terms_and_grads(teacher, student, "fused", **options)
    materialised = _terms_and_grads(teacher, student, "materialised", **options)
    assert fused[0].logit_kd_path == "fused" and materialised[0].logit_kd_path == "materialised"
    assert fused[1]["logit"] > 0 and fused[1]["task"] > 0
    _assert_same(fused, materialised)


def test_auto_uses_the_fused_path_for_causal_lms_and_the_head_never_makes_logits_in_a_step():
    teacher, student = _pair("gpt2")
    distiller = Distiller(teacher, student, feature="none", weights={"logit": 1.0})
    assert distiller.logit_kd_path == "fused"
    head_widths = []
    head = student.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: head_widths.append(out.shape[-1]))
    distiller(_batch())  # the first batch checks the projection against the model's logits once
    assert head_widths == [student.config.vocab_size, 0]
    distiller(_batch())
    distiller(_batch())
    assert head_widths == [student.config.vocab_size, 0, 0, 0]
    assert "forward" not in vars(head)  # the head's own forward is back


def test_a_top_k_teacher_goes_through_the_same_term_function():
    """``_term_sums(..., teacher_topk=(values, indices))`` on both paths against ``logit_kd`` on the
    student's logits."""
    teacher, student = _pair("llama")
    batch = _batch()
    results = {}
    for backend in ("fused", "materialised"):
        distiller = Distiller(
            teacher,
            student,
            feature="none",
            weights={"task": 1.0, "logit": 1.0},
            logit_kind="jsd",
            temperature=2.0,
            logit_kd_backend=backend,
        )
        positions = distiller._positions(batch)
        with torch.no_grad():
            teacher_logits = distiller._teacher_side(batch, positions, None)[0]
        topk = tuple(teacher_logits.topk(8, dim=-1))
        student_out, student_hidden = distiller._run_student(
            batch, functools.partial(distiller._fused_logit_sums, positions=positions,
                                     teacher_logits=None, teacher_topk=topk),
        )
        sums, _ = distiller._term_sums(
            batch, positions, None, {}, student_out, student_hidden, teacher_topk=topk
        )
        results[backend] = sums
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = student(**inputs).logits[:, :-1][positions.logits]
    want = logit_kd(
        logits, teacher_topk=topk, kind="jsd", temperature=2.0, beta=0.5, reduction="sum"
    )
    for sums in results.values():
        torch.testing.assert_close(sums["logit"].detach(), want, rtol=TERM_RTOL, atol=TERM_ATOL)
    torch.testing.assert_close(
        results["fused"]["task"].detach(), results["materialised"]["task"].detach(),
        rtol=TERM_RTOL, atol=TERM_ATOL,
    )  # fmt: skip


def _tiny_cohere(logit_scale: float):
    config = tf.CohereConfig(**_decoder_kwargs(logit_scale=logit_scale, tie_word_embeddings=True))
    return tf.CohereForCausalLM(config).eval()


def test_cohere_logit_scale_is_honoured():
    torch.manual_seed(3)
    teacher, student = _tiny_cohere(0.5), _tiny_cohere(0.25)
    options = dict(feature="none", weights={"task": 1.0, "logit": 1.0}, temperature=2.0)
    fused = _terms_and_grads(teacher, student, "fused", **options)
    _assert_same(fused, _terms_and_grads(teacher, student, "materialised", **options))


def test_soft_capped_logits_are_refused_by_fused_and_left_to_the_reference_by_auto():
    teacher, student = _pair("llama")
    student.config.final_logit_softcapping = 30.0
    options = dict(feature="none", weights={"logit": 1.0})
    with pytest.raises(ValueError, match="logit_kd_backend='fused'.*soft-caps its logits"):
        Distiller(teacher, student, logit_kd_backend="fused", **options)
    assert Distiller(teacher, student, **options).logit_kd_path == "materialised"


def test_an_unknown_transform_after_the_head_is_caught_on_the_first_batch():
    teacher, student = _pair("gpt2")

    def rescale(module, args, output):
        output.logits = output.logits * 3.0
        return output

    student.register_forward_hook(rescale)
    distiller = Distiller(teacher, student, feature="none", weights={"logit": 1.0})
    with pytest.raises(ValueError, match="logit_kd_backend: .*cannot reproduce"):
        distiller(_batch())


def test_models_without_a_causal_lm_head_use_the_reference_and_refuse_fused():
    teacher, student = build("bert"), build("bert")
    options = dict(feature="none", weights={"task": 1.0, "logit": 1.0})
    assert Distiller(teacher, student, **options).logit_kd_path == "materialised"
    with pytest.raises(ValueError, match="logit_kd_backend='fused': the fused path is for causal LMs"):
        Distiller(teacher, student, logit_kd_backend="fused", **options)
    with pytest.raises(ValueError, match="logit_kd_backend must be one of"):
        Distiller(teacher, student, logit_kd_backend="chunked", **options)

