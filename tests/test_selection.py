import json
import os

import _tiny_hf as tiny
import pytest
import torch
from safetensors.torch import save_file

from flexkd import DimensionSelection
from flexkd.adapters import TeacherIdentity

D = tiny.HIDDEN


def _random_scores(layers=(1, 3)):
    return {layer: torch.rand(D) for layer in layers}


@pytest.fixture(scope="module")
def teacher():
    return tiny.build("gpt2")


def test_round_trip_keeps_everything(tmp_path, teacher):
    sel = DimensionSelection.from_scores(
        _random_scores(), 8, teacher=teacher, stat="grad", tokens_seen=123, data_fingerprint="abc"
    )
    path = sel.save(tmp_path / "sub" / "sel.safetensors")
    assert [p.name for p in path.parent.iterdir()] == [
        "sel.safetensors"
    ]  # no temp file left behind
    loaded = DimensionSelection.load(path, teacher)
    assert loaded.metadata() == sel.metadata()
    assert loaded.metadata()["flexkd_version"] == __import__("flexkd").__version__
    for layer in sel.layers:
        assert torch.equal(loaded.scores(layer), sel.scores(layer))
        assert torch.equal(loaded.index(layer), sel.index(layer))
    assert loaded.index(-1).equal(sel.index(3))
    assert DimensionSelection.load(path).teacher == sel.teacher


def test_top_bottom_random_and_order():
    scores = torch.randperm(D).float()
    top = DimensionSelection.from_scores({2: scores}, 5)
    assert top.index(2).tolist() == sorted(torch.topk(scores, 5).indices.tolist())
    by_score = DimensionSelection.from_scores({2: scores}, 5, order="score")
    assert by_score.index(2).tolist() == torch.topk(scores, 5).indices.tolist()
    bottom = DimensionSelection.from_scores({2: scores}, 5, which="bottom", order="score")
    assert bottom.index(2).tolist() == torch.topk(scores, 5, largest=False).indices.flip(0).tolist()
    seed = int(torch.randint(0, 2**31, ()))
    rand = DimensionSelection.from_scores({2: scores}, 5, which="random", seed=seed)
    again = DimensionSelection.from_scores({2: scores}, 5, which="random", seed=seed)
    assert rand.index(2).equal(again.index(2)) and rand.index(2).unique().numel() == 5
    assert (rand.index(2).diff() > 0).all() and rand.seed == seed


def test_mass_in_top_k():
    scores = torch.rand(D)
    sel = DimensionSelection.from_scores({1: scores}, 4)
    expected = torch.topk(scores, 4).values.sum() / scores.sum()
    assert sel.mass_in_top_k(1) == pytest.approx(float(expected), rel=1e-6)
    assert DimensionSelection.from_scores({1: torch.zeros(D)}, 4).mass_in_top_k(1) == 0.0


def test_plot_writes_a_png(tmp_path):
    sel = DimensionSelection.from_scores(_random_scores(), 8)
    for layer in (None, 3):
        path = sel.plot(tmp_path / f"plot_{layer}.png", layer=layer)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_and_layer_errors(teacher):
    with pytest.raises(ValueError, match=r"k must be in \[1, 32\]"):
        DimensionSelection.from_scores(_random_scores(), D + 1)
    with pytest.raises(ValueError, match="k must be in"):
        DimensionSelection.from_scores(_random_scores(), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        DimensionSelection.from_scores(_random_scores(), 2.5)
    with pytest.raises(ValueError, match="negative layers need the teacher"):
        DimensionSelection.from_scores({-1: torch.rand(D)}, 2)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        DimensionSelection.from_scores({5: torch.rand(D)}, 2, teacher=teacher)
    with pytest.raises(ValueError, match="names layer 3 twice"):
        DimensionSelection.from_scores({3: torch.rand(D), -1: torch.rand(D)}, 2, teacher=teacher)
    with pytest.raises(TypeError, match="must be a float tensor"):
        DimensionSelection.from_scores({1: torch.arange(D)}, 2)
    with pytest.raises(ValueError, match="which must be one of"):
        DimensionSelection.from_scores({1: torch.rand(D)}, 2, which="middle")
    with pytest.raises(ValueError, match="stat must be one of"):
        DimensionSelection.from_scores({1: torch.rand(D)}, 2, stat="act")
    with pytest.raises(KeyError, match="holds layers"):
        DimensionSelection.from_scores({1: torch.rand(D)}, 2).index(2)


def _saved(tmp_path, teacher, name="sel.safetensors"):
    sel = DimensionSelection.from_scores(_random_scores(), 8, teacher=teacher)
    return sel.save(tmp_path / name)


def test_mismatched_teachers_fail_naming_the_mismatch(tmp_path, teacher):
    path = _saved(tmp_path, teacher)
    cases = {
        "hidden_size": tiny.tf.GPT2LMHeadModel(
            tiny.tf.GPT2Config(
                vocab_size=tiny.VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64
            )
        ),
        "num_layers": tiny.tf.GPT2LMHeadModel(
            tiny.tf.GPT2Config(vocab_size=tiny.VOCAB, n_embd=D, n_layer=4, n_head=4, n_positions=64)
        ),
        "model_type": tiny.build("llama"),
        "config": tiny.tf.GPT2LMHeadModel(
            tiny.tf.GPT2Config(vocab_size=tiny.VOCAB, n_embd=D, n_layer=3, n_head=2, n_positions=64)
        ),
        "weights": tiny.build("gpt2"),
    }
    for field, other in cases.items():
        with pytest.raises(ValueError, match=rf"does not match this teacher:(.|\n)*{field}"):
            DimensionSelection.load(path, other)
    # a fresh init of the same config differs only in weights, which can be waived
    DimensionSelection.load(path, cases["weights"], check_weights=False)


def test_side_mismatch_and_named_teachers(tmp_path):
    bart = tiny.build("bart")
    scores = {1: torch.rand(D)}
    path = DimensionSelection.from_scores(scores, 4, teacher=bart, side="decoder").save(
        tmp_path / "dec.safetensors"
    )
    DimensionSelection.load(path, bart)
    encoder_identity = TeacherIdentity.of(bart, side="encoder")
    decoder_identity = TeacherIdentity.of(bart, side="decoder")
    assert any("side" in problem for problem in decoder_identity.mismatches(encoder_identity))
    # the same name with a changed config only warns; a different name and config fails
    renamed = TeacherIdentity(
        **{**decoder_identity.to_dict(), "name": "org/bart", "config_hash": "0" * 64}
    )
    same_name = TeacherIdentity(**{**renamed.to_dict(), "config_hash": "1" * 64})
    assert renamed.mismatches(same_name) == []
    other_name = TeacherIdentity(**{**same_name.to_dict(), "name": "org/other"})
    assert any("config" in problem for problem in renamed.mismatches(other_name))


def test_bad_files_fail_loudly(tmp_path, teacher):
    with pytest.raises(FileNotFoundError, match="no selection file"):
        DimensionSelection.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DimensionSelection.load(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="without flexkd selection metadata"):
        DimensionSelection.load(plain)
    good = DimensionSelection.from_scores(_random_scores(), 8, teacher=teacher)
    meta = good.metadata()
    tensors = {"scores/1": good.scores(1), "index/1": good.index(1), "scores/3": good.scores(3)}
    save_file(tensors, tmp_path / "partial.safetensors", metadata={"flexkd": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"lacks tensors \['index/3'\]"):
        DimensionSelection.load(tmp_path / "partial.safetensors")
    future = dict(meta, format_version=99)
    tensors["index/3"] = good.index(3)
    save_file(tensors, tmp_path / "future.safetensors", metadata={"flexkd": json.dumps(future)})
    with pytest.raises(ValueError, match="version 99"):
        DimensionSelection.load(tmp_path / "future.safetensors")
    tensors["index/3"] = torch.zeros(8, dtype=torch.int64)
    save_file(tensors, tmp_path / "repeated.safetensors", metadata={"flexkd": json.dumps(meta)})
    with pytest.raises(ValueError, match="8 distinct dims"):
        DimensionSelection.load(tmp_path / "repeated.safetensors")


def test_unscored_selection_cannot_be_validated(teacher):
    with pytest.raises(ValueError, match="records no teacher identity"):
        DimensionSelection.from_scores({1: torch.rand(D)}, 2).validate(teacher)


def test_a_file_with_a_batch_based_fingerprint_still_loads(tmp_path, teacher):
    """Selections written before row-based fingerprints hold a bare sha256 hex of the batches."""
    old = "9f" * 32
    path = DimensionSelection.from_scores(
        _random_scores(), 8, teacher=teacher, data_fingerprint=old
    ).save(tmp_path / "old.safetensors")
    loaded = DimensionSelection.load(path, teacher)
    assert loaded.data_fingerprint == old and not loaded.data_fingerprint.startswith("rows:")


def _tampered(tmp_path, teacher, name, *, meta=None, drop=(), tensors=None):
    """A file written by a good selection, then changed: ``meta`` entries set (None: removed), metadata
    keys in ``drop`` removed, ``tensors`` entries replaced."""
    good = DimensionSelection.from_scores(_random_scores(), 8, teacher=teacher)
    data = good.metadata()
    for key, value in (meta or {}).items():
        data[key] = value
    for key in drop:
        del data[key]
    stored = {f"{kind}/{layer}": getattr(good, kind)(layer) for layer in good.layers for kind in ("scores", "index")}
    stored.update(tensors or {})
    path = tmp_path / f"{name}.safetensors"
    save_file(stored, path, metadata={"flexkd": json.dumps(data)})
    return path, good


INCONSISTENT = {
    "hidden_size disagrees with the teacher": (dict(meta={"hidden_size": D + 16}), "field hidden_size is"),
    "scores longer than hidden_size": (
        dict(tensors={"scores/1": torch.rand(D + 16)}), f"scores/1 has {D + 16} entries but field hidden_size is {D}"
    ),
    "NaN scores": (dict(tensors={"scores/3": torch.full((D,), float("nan"))}), "scores/3 holds NaN or inf"),
    "fp16 scores": (dict(tensors={"scores/3": torch.rand(D).half()}), "scores/3 must be fp32"),
    "int32 index": (dict(tensors={"index/1": torch.arange(8, dtype=torch.int32)}), "index/1 must be int64"),
    "index not the top-k": (dict(tensors={"index/1": torch.arange(8)}), "index/1 is not the top-8 of scores/1"),
    "index of the wrong length": (dict(tensors={"index/1": torch.arange(5)}), r"index of layer 1 has shape \(5,\)"),
    "missing layers": (dict(drop=["layers"]), "lacks the metadata field 'layers'"),
    "missing k": (dict(drop=["k"]), "lacks the metadata field 'k'"),
    "missing hidden_size": (dict(drop=["hidden_size"]), "lacks the metadata field 'hidden_size'"),
    "k a string": (dict(meta={"k": "8"}), "field k must be of type int"),
    "layers not ints": (dict(meta={"layers": ["1", 3]}), "field layers must be a non-empty list of ints"),
    "negative tokens_seen": (dict(meta={"tokens_seen": -1}), "field tokens_seen must be >= 0"),
    "unknown which": (dict(meta={"which": "middle"}), "is inconsistent: which must be one of"),
    "random without a seed": (dict(meta={"which": "random", "seed": None}), "field seed is missing"),
    "order changed": (dict(meta={"order": "score"}), "is not the top-8 of scores/1 \\(order 'score'\\)"),
}


@pytest.mark.parametrize("case", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_inconsistent_files_are_named_with_the_field(tmp_path, teacher, case):
    changes, words = case
    path, _ = _tampered(tmp_path, teacher, "bad", **changes)
    with pytest.raises(ValueError, match=words) as caught:
        DimensionSelection.load(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_broken_metadata_json_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"scores/1": torch.rand(D)}, path, metadata={"flexkd": '{"layers": [1'})
    with pytest.raises(ValueError, match="not valid JSON") as caught:
        DimensionSelection.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("which, order", [("top", "score"), ("bottom", "index"), ("random", "index")])
def test_every_which_and_order_round_trips_through_the_checks(tmp_path, teacher, which, order):
    sel = DimensionSelection.from_scores(_random_scores(), 8, teacher=teacher, which=which, order=order, seed=3)
    loaded = DimensionSelection.load(sel.save(tmp_path / "s.safetensors"), teacher)
    assert all(torch.equal(loaded.index(layer), sel.index(layer)) for layer in sel.layers)


@pytest.mark.parametrize(
    "teacher_id, short",
    [
        ("/root/.cache/flexkd/teachers/debian-sections-0123456789abcdef", "debian-sections-0123456789abcdef"),
        ("gpt2", "gpt2"),
        ("org/" + "x" * 40, "org/" + "x" * 27 + "…"),
    ],
)
def test_plot_titles_name_the_teacher_briefly(teacher_id, short):
    from flexkd.selection import _short_name

    assert _short_name(teacher_id) == short and len(short) <= 32
