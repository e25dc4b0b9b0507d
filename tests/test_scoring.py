import _tiny_hf as tiny
import pytest
import torch
import torch.nn.functional as F

import flexkd
from flexkd.adapters import get_adapter
from flexkd.ops import select_top_k


def _batches(name, count=3, prompt=3):
    """Padded batches; causal LMs also ignore a prompt prefix, which later tokens still attend to."""
    batches = [tiny.batch_for(name) for _ in range(count)]
    if name in ("gpt2", "llama"):
        for batch in batches:
            batch["labels"][:, :prompt] = -100
    return batches


def _naive_weights(name, batch, side):
    """Which positions count, written out independently of flexkd.adapters.token_weights."""
    attention = batch["attention_mask"].bool()
    if name in ("gpt2", "llama"):
        weights = torch.zeros_like(attention)
        weights[:, :-1] = attention[:, :-1] & (batch["labels"][:, 1:] != -100)
        return weights
    if side == "decoder":
        return batch["labels"] != -100
    return attention


def _naive_scores(model, batches, layers, name, side, stat="grad_x_act", use_mask=True):
    """Full backward of the summed loss with retain_grad on output_hidden_states, then f(h, g) summed
    over counted tokens."""
    model.zero_grad()
    totals = {layer: 0.0 for layer in layers}
    tokens = 0
    for batch in batches:
        out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states if side is None else getattr(out, f"{side}_hidden_states")
        for layer in layers:
            hidden[layer].retain_grad()
        # the model's own loss is a mean over its valid labels; times their count it is the sum
        labels = batch["labels"][:, 1:] if name in ("gpt2", "llama") else batch["labels"]
        (out.loss * (labels != -100).sum()).backward()
        weights = (
            _naive_weights(name, batch, side)
            if use_mask
            else torch.ones(hidden[0].shape[:2], dtype=torch.bool)
        )
        for layer in layers:
            h, g = hidden[layer].detach(), hidden[layer].grad
            per_element = {"grad_x_act": (h * g).abs(), "grad": g.abs(), "grad_sq": g * g}[stat]
            totals[layer] = totals[layer] + (per_element * weights[..., None]).sum((0, 1))
        tokens += int(weights.sum())
        model.zero_grad()
    return {layer: total / tokens for layer, total in totals.items()}, tokens


CASES = [("gpt2", None), ("llama", None), ("bert", None), ("bart", "encoder"), ("bart", "decoder")]


@pytest.mark.parametrize("name,side", CASES)
def test_scores_equal_a_naive_full_backward(name, side):
    model = tiny.build(name)
    batches = _batches(name)
    n = get_adapter(model, side=side).num_layers
    layers = [0, 1, n]
    sel = flexkd.score(model, batches, layers=[0, 1, -1], k=8, side=side, progress=False)
    expected, tokens = _naive_scores(model, batches, layers, name, side)
    assert sel.layers == layers and sel.tokens_seen == tokens and sel.k == 8
    for layer in layers:
        torch.testing.assert_close(sel.scores(layer), expected[layer], rtol=1e-4, atol=1e-7)
        assert torch.equal(sel.index(layer), select_top_k(sel.scores(layer), 8))
    if name in ("gpt2", "llama"):
        # the ignored prompt positions do carry gradient, so leaving them out must matter
        unmasked, _ = _naive_scores(model, batches, [0], name, side, use_mask=False)
        assert not torch.allclose(unmasked[0], expected[0], rtol=1e-3)


@pytest.mark.parametrize("stat", ["grad", "grad_sq"])
def test_other_stats_equal_the_naive_version(stat):
    model = tiny.build("llama")
    batches = _batches("llama", count=2)
    sel = flexkd.score(model, batches, layers=[2], k=4, stat=stat, progress=False)
    expected, _ = _naive_scores(model, batches, [2], "llama", None, stat=stat)
    torch.testing.assert_close(sel.scores(2), expected[2], rtol=1e-4, atol=1e-9)
    assert sel.stat == stat


def test_only_layers_above_the_tap_are_differentiated():
    model = tiny.build("gpt2").train()
    model.transformer.wpe.weight.requires_grad_(False)
    flags_before = [p.requires_grad for p in model.parameters()]
    seen = {}
    blocks = model.transformer.h
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
        for i, block in enumerate(blocks)
    ]
    try:
        flexkd.score(model, _batches("gpt2", count=1), layers=[2], k=4, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # layer 2 is block 1's output: blocks 0 and 1 ran without autograd, block 2 with it
    assert seen == {0: False, 1: False, 2: True}
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_a_summed_loss_fn_equals_the_default():
    model = tiny.build("gpt2")
    batches = _batches("gpt2", count=3)

    def summed_shifted_ce(outputs, batch):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            reduction="sum",
        )

    default = flexkd.score(model, batches, k=4, progress=False)
    custom = flexkd.score(model, iter(batches), k=4, loss_fn=summed_shifted_ce, progress=False)
    torch.testing.assert_close(custom.scores(-1), default.scores(-1), rtol=1e-5, atol=1e-8)
    assert custom.tokens_seen == default.tokens_seen
    assert custom.data_fingerprint == default.data_fingerprint


def test_max_rows_cuts_the_data_at_a_row_and_draws_no_further_batch():
    model = tiny.build("gpt2")
    batches = _batches("gpt2", count=3)  # 3 rows each
    drawn = []

    def stream():
        for batch in batches:
            drawn.append(batch)
            yield batch

    five = flexkd.score(model, stream(), k=4, max_rows=5, progress=False)
    assert len(drawn) == 2
    first_five = [
        {key: value[:n] for key, value in b.items()} for b, n in zip(batches, (3, 2), strict=False)
    ]
    expected = flexkd.score(model, first_five, k=4, progress=False)
    torch.testing.assert_close(five.scores(-1), expected.scores(-1), rtol=1e-5, atol=1e-9)
    assert five.tokens_seen == expected.tokens_seen
    assert five.data_fingerprint == expected.data_fingerprint
    everything = flexkd.score(model, batches, k=4, max_rows=100, progress=False)
    assert (
        everything.data_fingerprint
        == flexkd.score(model, batches, k=4, progress=False).data_fingerprint
    )
    assert everything.data_fingerprint != five.data_fingerprint


def test_max_batches_is_deprecated_but_still_counts_batches():
    model = tiny.build("gpt2")
    batches = _batches("gpt2", count=3)
    with pytest.warns(FutureWarning, match="use max_rows"):
        two = flexkd.score(model, batches, k=4, max_batches=2, progress=False)
    assert (
        two.data_fingerprint
        == flexkd.score(model, batches[:2], k=4, progress=False).data_fingerprint
    )
    with pytest.raises(ValueError, match="give max_rows only"):
        flexkd.score(model, batches, k=4, max_batches=2, max_rows=3, progress=False)


def test_selection_records_the_teacher():
    model = tiny.build("bart")
    sel = flexkd.score(
        model,
        _batches("bart", count=1),
        layers=[-1],
        k=5,
        side="decoder",
        order="score",
        progress=False,
    )
    assert sel.side == "decoder" and sel.num_layers == 2 and sel.hidden_size == tiny.HIDDEN
    scores = sel.scores(-1)
    assert (scores[sel.index(-1)].diff() <= 0).all()
    sel.validate(model)


def test_scoring_errors():
    model = tiny.build("gpt2")
    batch = tiny.batch_for("gpt2")
    unlabeled = {key: value for key, value in batch.items() if key != "labels"}
    with pytest.raises(ValueError, match=r"needs batch\['labels'\]"):
        flexkd.score(model, [unlabeled], k=4, progress=False)
    with pytest.raises(ValueError, match=r"k must be in \[1, 32\]"):
        flexkd.score(model, [batch], k=33, progress=False)
    with pytest.raises(TypeError, match="k must be an int"):
        flexkd.score(model, [batch], k=4.0, progress=False)
    with pytest.raises(ValueError, match="stat must be one of"):
        flexkd.score(model, [batch], k=4, stat="act", progress=False)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        flexkd.score(model, [batch], layers=[9], k=4, progress=False)
    with pytest.raises(TypeError, match="not a single batch"):
        flexkd.score(model, batch, k=4, progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        flexkd.score(model, [batch], k=4, max_batches=0, progress=False)
    with pytest.raises(ValueError, match="max_rows must be a positive int"):
        flexkd.score(model, [batch], k=4, max_rows=0, progress=False)
    with pytest.raises(TypeError, match="integer class indices"):
        flexkd.score(model, [dict(batch, labels=batch["labels"].float())], k=4, progress=False)
    with pytest.raises(ValueError, match="cannot tell the task"):
        flexkd.score(model.transformer, [unlabeled], k=4, progress=False)
    with pytest.raises(ValueError, match="no token was scored"):
        flexkd.score(model, [], k=4, progress=False)
    all_ignored = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no token was scored"):
        flexkd.score(
            model, [all_ignored], k=4, loss_fn=lambda out, b: out.logits.sum(), progress=False
        )
