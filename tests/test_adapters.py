import _tiny_hf as tiny
import pytest
import torch
from torch import nn

from flexkd.adapters import (
    FamilySpec,
    StackSpec,
    get_adapter,
    register_family,
    registered_model_types,
    token_weights,
    unwrap_model,
)

FAMILIES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "opt": "opt",
    "opt_project_out": "opt",
    "bert": "bert",
    "roberta": "bert",
    "bart": "bart",
    "mbart": "bart",
    "gpt_neox": "generic",
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_and_layer_count(name):
    model = tiny.build(name)
    adapter = get_adapter(model)
    assert adapter.family == FAMILIES[name]
    assert adapter.num_layers == tiny.LAYERS
    assert adapter.hidden_size == tiny.HIDDEN
    assert adapter.side == ("encoder" if name in tiny.SEQ2SEQ + ("bert", "roberta") else "decoder")


def test_supported_families_are_registered():
    assert {"gpt2", "llama", "qwen2", "mistral", "opt", "bert", "roberta", "bart"} <= set(
        registered_model_types()
    )


@pytest.mark.parametrize("name", tiny.SEQ2SEQ)
def test_seq2seq_sides(name):
    model = tiny.build(name)
    encoder, decoder = get_adapter(model, side="encoder"), get_adapter(model, side="decoder")
    assert encoder.sides == decoder.sides == ("encoder", "decoder")
    assert (encoder.num_layers, decoder.num_layers) == (tiny.LAYERS, 2)
    assert encoder.blocks[0] is not decoder.blocks[0]
    assert get_adapter(model).side == "encoder"


def test_opt_project_out_changes_the_last_width_only():
    adapter = get_adapter(tiny.build("opt_project_out"))
    assert adapter.layer_width(-1) == adapter.layer_width(tiny.LAYERS) == 16
    assert [adapter.layer_width(layer) for layer in range(tiny.LAYERS)] == [
        tiny.HIDDEN
    ] * tiny.LAYERS


def test_final_norm_is_the_last_site():
    model = tiny.build("llama")
    assert get_adapter(model).site(-1).module is model.model.norm
    assert get_adapter(model).site(0) == get_adapter(model).site(-tiny.LAYERS - 1)
    bert = tiny.build("bert")
    assert get_adapter(bert).site(-1).module is bert.bert.encoder.layer[-1]


def test_resolve_layer():
    adapter = get_adapter(tiny.build("gpt2"))
    n = tiny.LAYERS
    assert [adapter.resolve_layer(layer) for layer in range(-(n + 1), n + 1)] == list(
        range(n + 1)
    ) * 2
    assert adapter.resolve_layer(torch.tensor(1)) == 1
    for bad in (n + 1, -(n + 2)):
        with pytest.raises(ValueError, match="layer"):
            adapter.resolve_layer(bad)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="layer"):
            adapter.resolve_layer(bad)


def test_bad_side():
    with pytest.raises(ValueError, match="side 'decoder' does not exist"):
        get_adapter(tiny.build("bert"), side="decoder")
    with pytest.raises(ValueError, match="side must be"):
        get_adapter(tiny.build("bart"), side="middle")


class _Config:
    def __init__(self, model_type, **kwargs):
        self.model_type = model_type
        self.__dict__.update(kwargs)


class _TwoStacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config("toy", hidden_size=4, num_hidden_layers=2)
        self.a = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.b = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_unsupported_models_fail_clearly():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        get_adapter("gpt2")
    with pytest.raises(ValueError, match="config.model_type"):
        get_adapter(nn.Linear(3, 3))
    with pytest.raises(
        ValueError,
        match=r"no adapter for model_type 'toy'.*Registered families.*ModuleList of 2 blocks",
    ):
        get_adapter(_TwoStacks())


def test_register_family_makes_a_custom_model_work():
    model = _TwoStacks()
    model.config.model_type = "toy_registered"
    register_family("toy_registered", FamilySpec("toy", {"encoder": StackSpec("", "b")}))
    adapter = get_adapter(model)
    assert adapter.blocks == list(model.b) and adapter.final is None
    assert adapter.site(2).module is model.b[1]
    with pytest.raises(ValueError, match="family.stacks keys"):
        register_family("x", FamilySpec("x", {"middle": StackSpec("", "b")}))


def test_token_weights_causal_lm_uses_the_next_label():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, 9]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch = {"labels": labels, "attention_mask": attention}
    weights = token_weights(batch, task="causal_lm", side="decoder", shape=(2, 4))
    assert weights.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_token_weights_by_task():
    attention = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = torch.tensor([[-100, 3, -100], [4, -100, 5]])
    batch = {"attention_mask": attention, "labels": labels}
    token = token_weights(batch, task="token", side="encoder", shape=(2, 3))
    assert token.tolist() == [[False, True, False], [True, False, True]]
    seq = token_weights(
        {"attention_mask": attention, "labels": torch.tensor([0, 1])},
        task="sequence",
        side="encoder",
        shape=(2, 3),
    )
    assert seq.tolist() == (attention == 1).tolist()
    # seq2seq: the encoder uses attention_mask, the decoder its (unshifted) labels
    s2s = {"attention_mask": attention, "labels": torch.tensor([[3, -100], [4, 5]])}
    assert token_weights(s2s, task="seq2seq", side="encoder", shape=(2, 3)).tolist() == seq.tolist()
    assert token_weights(s2s, task="seq2seq", side="decoder", shape=(2, 2)).tolist() == [
        [True, False],
        [True, True],
    ]
    assert token_weights({}, task=None, side="encoder", shape=(2, 2)).all()


def test_token_weights_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        token_weights({}, task="classify", side="encoder", shape=(1, 2))
    with pytest.raises(ValueError, match="labels has shape"):
        token_weights(
            {"labels": torch.zeros(2, 5, dtype=torch.long)},
            task="causal_lm",
            side="decoder",
            shape=(2, 4),
        )
    with pytest.raises(TypeError, match="attention_mask"):
        token_weights({"attention_mask": [[1, 1]]}, task=None, side="encoder", shape=(1, 2))


def test_wrapped_models_are_unwrapped():
    model = tiny.build("gpt2")
    wrapped = nn.DataParallel(model)
    adapter = get_adapter(wrapped)
    assert adapter.model is model and adapter.blocks[0] is model.transformer.h[0]
    assert unwrap_model(wrapped) is model
