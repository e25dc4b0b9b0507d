"""PEFT (LoRA) students and PEFT-wrapped teachers: adapters, scoring, the Distiller and the loop see
through ``peft.PeftModel``; a config's ``model.student.lora`` trains and saves an adapter."""

import copy
import json

import _tiny_hf as tiny
import _train_helpers as th
import pytest
import torch
import transformers as tf
import yaml

import flexkd
from flexkd.adapters import get_adapter
from flexkd.adapters.masks import detect_task
from flexkd.errors import ConfigError

peft = pytest.importorskip("peft")

STUDENT_HIDDEN = 16


def _lora(model, targets=("q_proj", "v_proj")):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    return peft.get_peft_model(model, config)


def _llama(hidden, seed):
    options = tiny._decoder_kwargs()
    options["hidden_size"] = hidden
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**options))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return tiny.build("llama")


def _batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [tiny.padded_batch(4, 10, generator=generator) for _ in range(n)]


def test_adapter_and_task_see_through_peft_wrappers():
    base = _llama(STUDENT_HIDDEN, seed=1)
    student = _lora(base)
    for wrapped in (student, student.base_model):  # PeftModel and the LoraModel inside it
        adapter = get_adapter(wrapped)
        assert adapter.model is base and adapter.blocks == list(base.model.layers)
        assert (adapter.hidden_size, adapter.task) == (STUDENT_HIDDEN, "causal_lm")
    assert (
        detect_task(peft.PeftModel(_llama(8, seed=2), peft.LoraConfig(target_modules=["q_proj"])))
        == "causal_lm"
    )


def test_taps_on_a_peft_model_capture_the_adapted_hidden_states():
    from flexkd.taps import LayerTap

    student = _lora(_llama(STUDENT_HIDDEN, seed=1))
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_()  # LoRA B starts at 0; make the adapter change the function
    batch = _batches(1)[0]
    with torch.no_grad():
        reference = student(**batch, output_hidden_states=True).hidden_states
        base = student.get_base_model()
        with student.disable_adapter():
            unadapted = base(**batch, output_hidden_states=True).hidden_states
    with LayerTap(student, list(range(tiny.LAYERS + 1))) as tap, torch.no_grad():
        tap.run(**batch)
    for layer in range(tiny.LAYERS + 1):
        torch.testing.assert_close(tap.hidden[layer], reference[layer], rtol=0, atol=0)
    assert not torch.allclose(tap.hidden[-1], unadapted[-1])


def test_peft_wrapped_teacher_scores_and_distils_as_the_bare_teacher(teacher):
    batches = _batches(2)
    bare = flexkd.score(teacher, batches, layers=[1, -1], k=STUDENT_HIDDEN, progress=False)
    wrapped_teacher = _lora(copy.deepcopy(teacher))  # LoRA B starts at 0: the same function
    wrapped = flexkd.score(
        wrapped_teacher, batches, layers=[1, -1], k=STUDENT_HIDDEN, progress=False
    )
    for layer in (1, -1):
        torch.testing.assert_close(wrapped.scores(layer), bare.scores(layer), rtol=1e-6, atol=0)
        assert torch.equal(wrapped.index(layer), bare.index(layer))
    assert wrapped.teacher.hidden_size == bare.teacher.hidden_size == tiny.HIDDEN
    wrapped.validate(wrapped_teacher)

    student = _llama(STUDENT_HIDDEN, seed=1)
    weights = dict(task=1.0, logit=0.5, feature=1.0)
    _, bare_terms = flexkd.Distiller(teacher, student, selection=bare, weights=weights)(batches[0])
    _, terms = flexkd.Distiller(wrapped_teacher, student, selection=wrapped, weights=weights)(
        batches[0]
    )
    for name in ("task", "logit", "feature"):
        torch.testing.assert_close(terms[name], bare_terms[name], rtol=1e-6, atol=1e-7)


def _trained(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # LoRA B starts at 0: as if the adapter had been trained
    return model


def test_teacher_identity_of_a_peft_model_is_that_of_its_merged_weights(teacher):
    from flexkd.adapters.identity import weights_fingerprint
    from flexkd.errors import SelectionMismatchError

    selection = flexkd.score(teacher, _batches(1), layers=[-1], k=STUDENT_HIDDEN, progress=False)
    untrained = _lora(copy.deepcopy(teacher))
    # zero adapters compute the bare teacher: one identity, so a selection moves between the two
    assert weights_fingerprint(untrained) == weights_fingerprint(teacher)
    selection.validate(untrained)
    flexkd.score(untrained, _batches(1), layers=[-1], k=STUDENT_HIDDEN, progress=False).validate(
        teacher
    )

    trained = _trained(_lora(copy.deepcopy(teacher)))
    before = {name: value.clone() for name, value in trained.state_dict().items()}
    assert weights_fingerprint(trained) != weights_fingerprint(teacher)
    with pytest.raises(SelectionMismatchError, match="weights"):
        selection.validate(trained)
    # the fingerprint merges without touching the model
    assert all(torch.equal(trained.state_dict()[n], v) for n, v in before.items())
    assert not any(getattr(m, "merged_adapters", []) for m in trained.modules())
    with trained.disable_adapter():  # adapters off: the base again
        assert weights_fingerprint(trained) == weights_fingerprint(teacher)
    # an adapter on one layer in the middle, away from the first and last parameters, counts too
    middle = _trained(_lora(copy.deepcopy(teacher), targets=["layers.0.mlp.up_proj"]))
    assert weights_fingerprint(middle) not in (
        weights_fingerprint(teacher),
        weights_fingerprint(trained),
    )
    # merged in place, a layer in the first parameters keeps the identity its adapter gave it
    first = _trained(_lora(copy.deepcopy(teacher), targets=["layers.0.self_attn.q_proj"]))
    assert weights_fingerprint(first) != weights_fingerprint(teacher)
    assert weights_fingerprint(copy.deepcopy(first).merge_and_unload()) == weights_fingerprint(
        first
    )


def test_non_plain_lora_teacher_is_identified_as_base_plus_adapter(teacher):
    from flexkd.adapters.identity import weights_fingerprint

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    dora = peft.get_peft_model(copy.deepcopy(teacher), config)
    assert weights_fingerprint(dora) != weights_fingerprint(teacher)


def test_lora_student_distils_and_trains_only_the_adapter(teacher):
    batches = _batches(1)
    selection = flexkd.score(teacher, batches, layers=[-1], k=STUDENT_HIDDEN, progress=False)
    student = _lora(_llama(STUDENT_HIDDEN, seed=1))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    distiller = flexkd.Distiller(
        teacher, student, selection=selection, weights=dict(task=1.0, logit=0.5, feature=1.0)
    )
    trainable = {n for n, p in distiller.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(distiller.trainable_parameters()) == len(trainable)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = distiller(batches[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, param in student.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} is not LoRA but changed"


def _lora_config(folder, lora, *, train=None, name="cfg.yaml"):
    path = th.write_causal_config(
        folder, train={"max_steps": 3, **(train or {})}, dropout=0.0, name=name
    )
    config = yaml.safe_load(path.read_text())
    config["model"]["student"]["lora"] = lora
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_config_lora_student_saves_an_adapter_peft_loads(tmp_path):
    path = _lora_config(
        tmp_path, {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "save_merged": True}
    )
    cfg = flexkd.load_config(path)
    result = flexkd.train(cfg)
    saved = result.student_dir
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["target_modules"] == ["c_attn"]
    assert not (saved / "model.safetensors").exists()  # the adapter only; the base stays as it was

    # the base is the config's seeded random init: rebuild it, attach the saved adapter
    from flexkd.training.models import build_model

    cfg.model.student.lora = None
    base = build_model(cfg, "student")
    loaded = peft.PeftModel.from_pretrained(base, saved).eval()
    merged = tf.AutoModelForCausalLM.from_pretrained(saved / "merged").eval()
    batch = th.causal_batch()
    with torch.no_grad():
        adapted, plain = loaded(**batch).logits, merged(**batch).logits
        untrained = build_model(cfg, "student").eval()(**batch).logits
    torch.testing.assert_close(adapted, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, untrained, atol=1e-4)  # the adapter learned something
    metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics if "step" in m] == [1, 2, 3]

    # flexkd eval attaches the adapter to the base the config builds
    from flexkd.cli import main
    from flexkd.training.models import load_trained_student

    with torch.no_grad():
        reloaded = load_trained_student(flexkd.load_config(path), saved).eval()(**batch).logits
    torch.testing.assert_close(reloaded, adapted)
    assert main(["eval", str(path)]) == 0
    report = json.loads(cfg.eval_output.read_text())
    assert report["models"]["student"]["loss"] > 0


def test_config_lora_student_resumes_from_its_checkpoint(tmp_path):
    import shutil

    from safetensors.torch import load_file

    lora = {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}
    path = _lora_config(tmp_path, lora, train={"max_steps": 4, "checkpoint_every": 2})
    out = tmp_path / "out"
    flexkd.train(flexkd.load_config(path))
    uninterrupted = load_file(out / "student" / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed after step 2's checkpoint
    shutil.rmtree(out / "student")
    flexkd.train(flexkd.load_config(path))
    resumed = load_file(out / "student" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and resumed
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_lora_target_module_that_does_not_exist_fails_naming_the_field(tmp_path):
    path = _lora_config(tmp_path, {"r": 4, "target_modules": ["c_attn", "q_proj"]})
    with pytest.raises(
        ConfigError, match=r"model\.student\.lora\.target_modules: \['q_proj'\].*c_attn"
    ):
        flexkd.train(flexkd.load_config(path))
    assert not (tmp_path / "out" / "student").exists()


def test_lora_section_is_validated_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.student\.lora\.r"):
        flexkd.load_config(_lora_config(tmp_path, {"r": 0}))
    path = _lora_config(tmp_path, {"r": 4})
    config = yaml.safe_load(path.read_text())
    config["model"]["teacher"]["lora"] = {"r": 4}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"model\.teacher.*only model\.student takes a lora"):
        flexkd.load_config(path)


def test_pretrained_student_with_lora_builds_from_its_folder(tmp_path):
    from flexkd.training.models import build_model

    base = th.build(th.gpt2_config(th.STUDENT_HIDDEN, 1), seed=3)
    base.save_pretrained(tmp_path / "base")
    path = _lora_config(tmp_path, {"r": 2, "target_modules": ["c_attn"]})
    config = yaml.safe_load(path.read_text())
    config["model"]["student"] = {"pretrained": "base", "lora": config["model"]["student"]["lora"]}
    path.write_text(yaml.safe_dump(config))
    cfg = flexkd.load_config(path)
    assert cfg.resolved()["model"]["student"]["pretrained"] == str(tmp_path / "base")
    student = build_model(cfg, "student")
    assert isinstance(student, peft.PeftModel)
    inner = student.get_base_model().state_dict()
    for name, value in base.state_dict().items():
        key = name.replace("c_attn.weight", "c_attn.base_layer.weight").replace(
            "c_attn.bias", "c_attn.base_layer.bias"
        )
        assert torch.equal(inner[key], value), name


def _teacher_adapter_config(tmp_path, adapter="teacher-adapter"):
    path = _lora_config(tmp_path, {"r": 4, "target_modules": ["c_attn"]}, train={"max_steps": 2})
    config = yaml.safe_load(path.read_text())
    config["model"]["teacher"]["adapter"] = adapter
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_config_teacher_adapter_is_loaded_for_scoring_and_distillation(tmp_path):
    from flexkd.adapters.identity import weights_fingerprint
    from flexkd.selection import DimensionSelection
    from flexkd.training.models import build_model

    bare_cfg = flexkd.load_config(th.write_causal_config(tmp_path, name="bare.yaml"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    adapted = _trained(peft.get_peft_model(build_model(bare_cfg, "teacher"), config)).eval()
    adapted.save_pretrained(tmp_path / "teacher-adapter")

    cfg = flexkd.load_config(_teacher_adapter_config(tmp_path))
    assert cfg.resolved()["model"]["teacher"]["adapter"] == str(tmp_path / "teacher-adapter")
    teacher = build_model(cfg, "teacher").eval()
    assert isinstance(teacher, peft.PeftModel)
    assert not any(p.requires_grad for p in teacher.parameters())  # the adapter is frozen too
    batch = th.causal_batch()
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, adapted(**batch).logits)
        bare_logits = build_model(bare_cfg, "teacher").eval()(**batch).logits
    assert not torch.allclose(teacher(**batch).logits, bare_logits, atol=1e-4)

    result = flexkd.train(cfg)  # scores the adapted teacher, then distils from it
    selection = DimensionSelection.load(cfg.selection_path, teacher=teacher)
    assert selection.teacher.weights_fingerprint == weights_fingerprint(adapted)
    assert selection.teacher.weights_fingerprint != weights_fingerprint(
        build_model(bare_cfg, "teacher")
    )
    metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_teacher_adapter_field_is_checked_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.teacher\.adapter: .*missing.*adapter_config"):
        flexkd.load_config(_teacher_adapter_config(tmp_path, adapter="missing"))
    path = _teacher_adapter_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["model"]["student"]["adapter"] = config["model"]["teacher"].pop("adapter")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"model\.student.*adapter: only model\.teacher"):
        flexkd.load_config(path)
