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


def _t5(encoder_layers=3, decoder_layers=2, d_model=tiny.HIDDEN):
    import transformers as tf

    config = tf.T5Config(
        vocab_size=tiny.VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=encoder_layers,
        num_decoder_layers=decoder_layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tf.T5ForConditionalGeneration(config).eval()


def test_t5_with_unequal_depths_finds_both_stacks():
    from flexkd.taps import LayerTap

    model = _t5()
    encoder, decoder = get_adapter(model, side="encoder"), get_adapter(model, side="decoder")
    assert (encoder.num_layers, decoder.num_layers) == (3, 2)
    assert decoder.blocks == list(model.decoder.block)
    batch = tiny.padded_batch(seq2seq=True)
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).decoder_hidden_states
    with LayerTap(model, [0, 1, 2], side="decoder") as tap, torch.no_grad():
        tap.run(**batch)
    for layer in range(3):
        torch.testing.assert_close(tap.hidden[layer], reference[layer], rtol=0, atol=0)


def test_t5_decoder_side_scores_and_distils():
    import flexkd

    teacher, student = _t5(), _t5(encoder_layers=2, decoder_layers=1, d_model=16)
    batch = tiny.padded_batch(seq2seq=True)
    selection = flexkd.score(teacher, [batch], layers=[-1], k=16, side="decoder")
    assert selection.scores(-1).shape == (tiny.HIDDEN,)
    distiller = flexkd.Distiller(teacher, student, selection=selection, side="decoder")
    loss, terms = distiller(batch)
    assert torch.isfinite(loss) and float(terms["feature"]) > 0
    loss.backward()
    assert student.decoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0


def _opt_350m_style(hidden, projected):
    import transformers as tf

    options = tiny._opt_kwargs(do_layer_norm_before=False, word_embed_proj_dim=projected)
    options.update(hidden_size=hidden, num_attention_heads=4)
    return tf.OPTForCausalLM(tf.OPTConfig(**options)).eval()


def test_opt_project_out_selection_and_distiller_agree_on_the_last_width(tmp_path):
    """The last layer is the projected one (HF hidden_states[-1] includes project_out): its scores have
    the projected width, the selection records the teacher's hidden size, and the Distiller accepts both."""
    import flexkd
    from flexkd.errors import SelectionMismatchError

    teacher = tiny.build("opt_project_out")  # hidden 32, last layer projected to 16
    student = _opt_350m_style(hidden=16, projected=8)
    batch = tiny.batch_for("opt")
    with torch.no_grad():
        last = teacher(**batch, output_hidden_states=True).hidden_states[-1]
    assert last.shape[-1] == 16
    selection = flexkd.score(teacher, [batch], layers=[1, -1], k=8)
    assert selection.hidden_size == tiny.HIDDEN
    assert selection.scores(-1).shape == (16,) and selection.scores(1).shape == (tiny.HIDDEN,)
    selection.save(tmp_path / "sel")
    loaded = flexkd.DimensionSelection.load(tmp_path / "sel", teacher=teacher)
    distiller = flexkd.Distiller(teacher, student, selection=loaded, layer_pairs=[(-1, -1)])
    loss, terms = distiller(batch)
    assert torch.isfinite(loss) and float(terms["feature"]) > 0
    # a selection that records no teacher (its hidden_size read off the scores) works the same
    bare = flexkd.DimensionSelection.from_scores({tiny.LAYERS: selection.scores(-1)}, k=8)
    _, bare_terms = flexkd.Distiller(teacher, student, selection=bare)(batch)
    assert float(bare_terms["feature"]) == pytest.approx(float(terms["feature"]))
    # the layer-1 scores (width 32) cannot stand in for the projected last layer (width 16)
    inner = flexkd.DimensionSelection.from_scores({-1: selection.scores(1)}, k=8, teacher=teacher)
    with pytest.raises(SelectionMismatchError, match="width 16"):
        flexkd.Distiller(teacher, student, selection=inner, layer_pairs=[(-1, -1)])
