import _tiny_hf as tiny
import pytest
import torch

from flexkd.adapters import get_adapter
from flexkd.taps import LayerTap

CASES = [(name, None) for name in tiny.BUILDERS if name not in tiny.SEQ2SEQ] + [
    (name, side) for name in tiny.SEQ2SEQ for side in ("encoder", "decoder")
]


def _reference(model, batch, side):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    if side is None:
        return out.hidden_states
    return out.encoder_hidden_states if side == "encoder" else out.decoder_hidden_states


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (tiny.build(name), tiny.batch_for(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name,side", CASES)
def test_every_tap_equals_output_hidden_states(built, name, side):
    model, batch = built(name)
    reference = _reference(model, batch, side)
    n = len(reference) - 1
    with LayerTap(model, list(range(-(n + 1), n + 1)), side=side) as tap, torch.no_grad():
        outputs = tap.run(**batch)
    assert outputs is not None and tap.layers == list(range(n + 1))
    for layer in range(-(n + 1), n + 1):
        assert torch.equal(tap.hidden[layer], reference[layer]), f"layer {layer}"


@pytest.mark.parametrize("name,side", CASES)
def test_early_exit_gives_the_same_values_and_skips_the_rest(built, name, side):
    model, batch = built(name)
    reference = _reference(model, batch, side)
    n = len(reference) - 1
    adapter = get_adapter(model, side=side)
    for deepest in range(n + 1):
        calls = []
        later = adapter.blocks[deepest:] if deepest < n else []
        handles = [block.register_forward_hook(lambda *_, c=calls: c.append(1)) for block in later]
        try:
            layers = sorted({0, deepest // 2, deepest})
            with (
                LayerTap(model, layers, side=side, stop_after_deepest=True) as tap,
                torch.no_grad(),
            ):
                assert tap.run(**batch) is None
        finally:
            for handle in handles:
                handle.remove()
        assert not calls, f"blocks above layer {deepest} ran"
        for layer in layers:
            assert torch.equal(tap.hidden[layer], reference[layer])


@pytest.mark.parametrize("name,side", CASES)
def test_columns_keep_the_index_select_of_the_full_hidden(built, name, side):
    model, batch = built(name)
    reference = _reference(model, batch, side)
    adapter = get_adapter(model, side=side)
    layers = [0, 1, -1]
    columns = {}
    for layer in layers:
        width = adapter.layer_width(layer)
        columns[layer] = torch.randperm(width)[: int(torch.randint(1, width + 1, ()))]
    with (
        LayerTap(model, layers, columns=columns, side=side, stop_after_deepest=True) as tap,
        torch.no_grad(),
    ):
        tap.run(**batch)
    for layer, index in columns.items():
        assert torch.equal(tap.hidden[layer], reference[layer].index_select(-1, index))


def test_student_side_taps_keep_the_graph():
    model = tiny.build("llama").train()
    batch = tiny.batch_for("llama")
    with LayerTap(model, [1, -1]) as tap:
        tap.run(**batch)
    (tap.hidden[1].square().mean() + tap.hidden[-1].mean()).backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.norm.weight.grad is not None


def test_grad_leaf_cuts_the_graph_below_the_shallowest_layer():
    model = tiny.build("gpt2")
    batch = tiny.batch_for("gpt2")
    with LayerTap(model, [2, 3], grad_leaf=True) as tap:
        loss = tap.run(**batch).loss
    assert tap.hidden[2].is_leaf and tap.hidden[2].requires_grad
    grads = torch.autograd.grad(loss, [tap.hidden[2], tap.hidden[3]])
    assert all(g.shape == (3, 9, tiny.HIDDEN) for g in grads)
    loss = None
    with LayerTap(model, [2], grad_leaf=True) as tap:
        tap.run(**batch).loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is None
    assert model.transformer.h[2].attn.c_attn.weight.grad is not None


def test_hooks_are_removed_and_reinstalled():
    model = tiny.build("bert")
    modules = list(model.modules())
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    tap = LayerTap(model, [0, -1])
    with tap:
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules) == before + 2
        with pytest.raises(RuntimeError, match="already installed"):
            tap.__enter__()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules) == before
    with tap, torch.no_grad():
        tap.run(**tiny.batch_for("bert"))
    assert set(tap.hidden) == {0, tiny.LAYERS}


def test_tap_errors():
    model = tiny.build("gpt2")
    with pytest.raises(RuntimeError, match="inside `with LayerTap"):
        LayerTap(model, [1]).run(input_ids=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        LayerTap(model, [7])
    with pytest.raises(ValueError, match="at least one layer"):
        LayerTap(model, [])
    with pytest.raises(TypeError, match="layers must be a sequence"):
        LayerTap(model, "1")
    with pytest.raises(ValueError, match="not among the tapped layers"):
        LayerTap(model, [1], columns={2: torch.tensor([0])})
    with pytest.raises(ValueError, match=r"columns\[1\]"):
        LayerTap(model, [1], columns={1: torch.tensor([0, tiny.HIDDEN])})
    with pytest.raises(ValueError, match="names layer 3 twice"):
        LayerTap(model, [3], columns={3: torch.tensor([0]), -1: torch.tensor([1])})
    with pytest.raises(TypeError, match=r"columns\[1\] must be a 1-D integer tensor"):
        LayerTap(model, [1], columns={1: torch.tensor([0.0])})
    tap = LayerTap(model, [1])
    with pytest.raises(KeyError, match="not captured"):
        tap.hidden[1]


def test_taps_fire_through_a_wrapper():
    model = tiny.build("llama")
    batch = tiny.batch_for("llama")
    reference = _reference(model, batch, None)
    with LayerTap(torch.nn.DataParallel(model), [2]) as tap, torch.no_grad():
        assert tap.run(**batch) is not None
    assert torch.equal(tap.hidden[2], reference[2])
