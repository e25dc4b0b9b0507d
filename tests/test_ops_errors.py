"""Every bad input named in DESIGN §2 raises ValueError/TypeError naming the argument."""

import pytest
import torch

from flexkd.ops import flex_feature_loss, importance_scores

S, T, INDEX = torch.randn(4, 3), torch.randn(4, 8), torch.tensor([0, 5, 2])


def feature_loss_case(**changes):
    args = dict(student=S, teacher=T, index=INDEX, mask=None, loss="mse", reduction="mean", backend="torch")
    args.update(changes)
    return args


FEATURE_LOSS_ERRORS = {
    "leading shape": (feature_loss_case(teacher=torch.randn(5, 8)), ValueError, "leading shape"),
    "3-D leading shape": (feature_loss_case(student=torch.randn(2, 4, 3), teacher=torch.randn(2, 5, 8)), ValueError, "leading shape"),
    "index out of range": (feature_loss_case(index=torch.tensor([0, 8, 2])), ValueError, r"index values must lie in \[0, 8\)"),
    "negative index": (feature_loss_case(index=torch.tensor([0, -1, 2])), ValueError, "index values"),
    "repeated index": (feature_loss_case(index=torch.tensor([1, 1, 2])), ValueError, "index must not repeat"),
    "index length": (feature_loss_case(index=torch.tensor([0, 1])), ValueError, "index must be 1-D"),
    "index 2-D": (feature_loss_case(index=torch.tensor([[0, 1, 2]])), ValueError, "index must be 1-D"),
    "float index": (feature_loss_case(index=torch.tensor([0.0, 1.0, 2.0])), TypeError, "index must be an integer tensor"),
    "int student": (feature_loss_case(student=torch.ones(4, 3, dtype=torch.int64)), TypeError, "student must be a float"),
    "int teacher": (feature_loss_case(teacher=torch.ones(4, 8, dtype=torch.int32)), TypeError, "teacher must be a float"),
    "list student": (feature_loss_case(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
    "k = 0": (feature_loss_case(student=torch.randn(4, 0), index=torch.tensor([], dtype=torch.int64)), ValueError, "k >= 1"),
    "k > D": (feature_loss_case(student=torch.randn(4, 9), index=torch.arange(9)), ValueError, "k must be <= D"),
    "mask shape": (feature_loss_case(mask=torch.ones(5)), ValueError, "mask must have the leading shape"),
    "mask dtype": (feature_loss_case(mask=torch.ones(4, dtype=torch.int64)), TypeError, "mask must be a bool or float"),
    "unknown loss": (feature_loss_case(loss="kl"), ValueError, "loss must be one of"),
    "unknown reduction": (feature_loss_case(reduction="avg"), ValueError, "reduction must be one of"),
    "unknown backend": (feature_loss_case(backend="metal"), ValueError, "backend must be one of"),
    "devices differ": (feature_loss_case(teacher=T.to("meta")), ValueError, "one device"),
    "scalar student": (feature_loss_case(student=torch.tensor(1.0)), ValueError, "student must have at least one dimension"),
    "bool index": (feature_loss_case(index=torch.tensor([True, False, True])), TypeError, "index must be an integer tensor"),
    "index of floats": (feature_loss_case(index=[0.0, 1.0, 2.0]), TypeError, "index must be an integer tensor or a sequence of ints"),
    "index of bools": (feature_loss_case(index=[True, False, True]), TypeError, "sequence of ints"),
    "index string": (feature_loss_case(index="012"), TypeError, "sequence of ints, got str"),
    "index set": (feature_loss_case(index={0, 1, 2}), TypeError, "sequence of ints, got set"),
    "index list out of range": (feature_loss_case(index=[0, 8, 2]), ValueError, r"index values must lie in \[0, 8\)"),
    "index list repeated": (feature_loss_case(index=[1, 1, 2]), ValueError, "index must not repeat"),
    "negative mask weight": (feature_loss_case(mask=torch.tensor([1.0, -0.5, 1.0, 1.0])), ValueError, "mask weights must be finite and >= 0"),
    "NaN mask weight": (feature_loss_case(mask=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, r"mask weights .* \(e\.g\. nan\)"),
    "inf mask weight": (feature_loss_case(mask=torch.tensor([float("inf"), 1.0, 1.0, 1.0])), ValueError, "mask weights must be finite"),
}


@pytest.mark.parametrize("case", FEATURE_LOSS_ERRORS.values(), ids=FEATURE_LOSS_ERRORS.keys())
def test_feature_loss_bad_input(case):
    args, error, words = case
    positional = [args.pop(name) for name in ("student", "teacher", "index", "mask")]
    with pytest.raises(error, match=words):
        flex_feature_loss(*positional, **args)


@pytest.mark.parametrize(
    "index",
    [[0, 5, 2], (0, 5, 2), torch.tensor([0, 5, 2], dtype=torch.int16), torch.tensor([0, 5, 2], dtype=torch.uint8)],
    ids=["list", "tuple", "int16", "uint8"],
)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_index_as_any_int_tensor_or_sequence(index, backend):
    want = flex_feature_loss(S, T, INDEX, backend="torch")
    torch.testing.assert_close(flex_feature_loss(S, T, index, backend=backend), want)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        flex_feature_loss(S, T, INDEX, eps=-1.0)


def test_index_checked_again_after_in_place_change():
    index = torch.tensor([0, 5, 2])
    flex_feature_loss(S, T, index, backend="torch")
    index[1] = 0
    with pytest.raises(ValueError, match="repeat"):
        flex_feature_loss(S, T, index, backend="torch")


IMPORTANCE_ERRORS = {
    "shape": (dict(hidden=T, grad=torch.randn(4, 7)), ValueError, "grad must have the shape of hidden"),
    "int hidden": (dict(hidden=T.long(), grad=T), TypeError, "hidden must be a float"),
    "int grad": (dict(hidden=T, grad=T.long()), TypeError, "grad must be a float"),
    "stat": (dict(hidden=T, grad=T, stat="hessian"), ValueError, "stat must be one of"),
    "mask shape": (dict(hidden=T, grad=T, mask=torch.ones(3)), ValueError, "mask must have the leading shape"),
    "out dtype": (dict(hidden=T, grad=T, out=torch.zeros(8, dtype=torch.float64)), TypeError, "out must be a float32"),
    "out shape": (dict(hidden=T, grad=T, out=torch.zeros(7)), ValueError, "out must be a contiguous"),
    "out strided": (dict(hidden=T, grad=T, out=torch.zeros(16)[::2]), ValueError, "out must be a contiguous"),
    "devices": (dict(hidden=T, grad=T.to("meta")), ValueError, "one device"),
    "backend": (dict(hidden=T, grad=T, backend="tpu"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", IMPORTANCE_ERRORS.values(), ids=IMPORTANCE_ERRORS.keys())
def test_importance_bad_input(case):
    args, error, words = case
    with pytest.raises(error, match=words):
        importance_scores(args.pop("hidden"), args.pop("grad"), **args)
