import dataclasses

import pytest

from flexkd_lab.tasks.pairs import PAIRS, get_pair


def test_pairs_describe_the_two_width_ratios():
    assert PAIRS["minilm-tiny"].ratio == "3:1"
    assert PAIRS["mpnet-minilm"].ratio == "2:1"
    assert not PAIRS["minilm-tiny"].own_teacher_ids
    assert PAIRS["mpnet-minilm"].own_teacher_ids


def test_unknown_pair_is_refused_by_name():
    with pytest.raises(ValueError, match="pair: expected one of"):
        get_pair("gpt2-tiny")


def test_the_teacher_lr_is_chosen_on_validation(monkeypatch, tmp_path):
    import flexkd_lab.tasks as tasks
    from flexkd_lab.experiments.kits import cached_teacher
    from flexkd_lab.tasks.teacher_cache import CachedTeacher

    accuracy = {1e-4: 0.70, 2e-4: 0.74}
    trained = []

    def fake_get_teacher(task, cache_dir, *, fit_config, **_):
        trained.append(fit_config)
        report = {"fit": fit_config.to_dict(), "validation": {"accuracy": accuracy[fit_config.lr]}}
        return CachedTeacher(None, f"{cache_dir}/{fit_config.lr}", report, reused=False)

    monkeypatch.setattr(tasks, "get_teacher", fake_get_teacher)
    monkeypatch.setitem(PAIRS, "minilm-tiny", dataclasses.replace(PAIRS["minilm-tiny"], lr_grid=(1e-4, 2e-4)))
    _, best = cached_teacher("debian-sections", cache_dir=tmp_path, pair="minilm-tiny", progress=False)
    assert [f.lr for f in trained] == [1e-4, 2e-4]
    assert best.report["fit"]["lr"] == 2e-4
    assert best.report["lr_grid"] == {"0.0001": 0.70, "0.0002": 0.74}
    assert all(f.epochs == 3 and f.train_limit is None for f in trained)
