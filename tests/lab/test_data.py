"""The Debian snapshot: builder pieces, the committed files, and the loaders."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess

import pytest

from flexkd_lab.data import SNAPSHOT_DIR, SPLITS, label_names, load_task, read_rows, snapshot_meta
from flexkd_lab.data.apt_lists import iter_stanzas, read_list_file, release_info
from flexkd_lab.data.build_debian import BuildConfig, build, split_of, water_fill_cap
from flexkd_lab.data.near_dup import near_duplicate_clusters
from flexkd_lab.data.provenance import render_provenance
from flexkd_lab.data.text import (
    mask_names,
    name_stem,
    names_to_mask,
    normalise_for_dedup,
    split_description,
    truncate_words,
)

TASK_NAMES = ("debian-sections", "debian-synopsis")


# --- text handling -----------------------------------------------------------------------


def test_split_description_follows_deb822_layout():
    field = (
        "frobnicate widgets quickly\n"
        " Frob is a tool that frobnicates\n"
        " widgets.\n"
        " .\n"
        " Features:\n"
        "  * fast\n"
        "  * small\n"
    )
    synopsis, body = split_description(field)
    assert synopsis == "frobnicate widgets quickly"
    assert body == "Frob is a tool that frobnicates widgets.\nFeatures:\n* fast\n* small"


@pytest.mark.parametrize(
    ("package", "stem"),
    [
        ("libghc-aeson-dev", "aeson"),
        ("python3-requests", "requests"),
        ("librust-serde-json-dev", "serde-json"),
        ("golang-github-spf13-cobra-dev", "spf13-cobra"),
        ("libfoo1.2t64", "foo"),
        ("r-cran-data.table", "data.table"),
        ("0ad-data-common", "0ad"),
    ],
)
def test_name_stem_strips_packaging_affixes(package, stem):
    assert name_stem(package) == stem


def test_names_to_mask_skips_short_and_generic_stems():
    assert names_to_mask(["libc6"]) == ["libc6"]
    assert names_to_mask(["python3-doc"]) == ["python3-doc"]
    assert "cobra" in names_to_mask(["golang-github-spf13-cobra-dev"])


def test_mask_names_matches_whole_tokens_with_any_separator():
    names = names_to_mask(["librust-serde-json-dev"])
    text = "Serde_JSON parses; serde-json. SERDE json, but not serde-jsonx or xserde-json."
    assert mask_names(text, names) == "PKG parses; PKG. PKG, but not serde-jsonx or xserde-json."
    with pytest.raises(ValueError, match="names"):
        mask_names("x", [])


def test_normalise_and_truncate():
    assert normalise_for_dedup("Version 1.2.3 -- GREAT!") == normalise_for_dedup(
        "version 4.5.66 great"
    )
    assert truncate_words("alpha beta gamma", 12) == "alpha beta"
    assert truncate_words("short", 100) == "short"
    with pytest.raises(ValueError, match="max_chars"):
        truncate_words("x", 0)


def test_near_duplicates_cluster_and_distinct_texts_stay_apart():
    rng = random.Random()
    vocab = [f"w{i}" for i in range(3000)]
    base = [rng.choice(vocab) for _ in range(80)]
    near = base[:-1] + ["extra"]  # one word changed out of 80
    distinct = [" ".join(rng.choice(vocab) for _ in range(80)) for _ in range(50)]
    texts = [" ".join(base), *distinct, " ".join(near)]
    roots = near_duplicate_clusters(texts)
    assert roots[-1] == 0
    assert roots[1:-1] == list(range(1, len(texts) - 1))
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_clusters(texts, threshold=0)


def test_water_fill_cap_balances_within_budget():
    counts = {"a": 1000, "b": 50, "c": 300}
    cap = water_fill_cap(counts, 600)
    assert sum(min(n, cap) for n in counts.values()) <= 600
    assert sum(min(n, cap + 1) for n in counts.values()) > 600
    assert water_fill_cap(counts, 10_000) == 1000


# --- apt lists and the builder -------------------------------------------------------------


def test_iter_stanzas_and_errors():
    text = "Package: a\nDescription-en: one\n two\n\nPackage: b\n"
    assert list(iter_stanzas(text)) == [
        {"Package": "a", "Description-en": "one\n two"},
        {"Package": "b"},
    ]
    with pytest.raises(ValueError, match="continuation"):
        list(iter_stanzas(" orphan\n"))
    with pytest.raises(ValueError, match="malformed"):
        list(iter_stanzas("no colon here\n"))


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
def test_read_list_file_decompresses_lz4(tmp_path):
    plain = tmp_path / "Packages"
    plain.write_text("Package: zz\nSection: misc\n")
    subprocess.run(["lz4", "-q", str(plain), str(tmp_path / "Packages.lz4")], check=True)
    assert read_list_file(str(tmp_path / "Packages.lz4")) == plain.read_text()


_TOPICS = {
    "games": "game players level score arcade puzzle adventure board strategy fun",
    "python": "python module library import interpreter bindings pip package api class",
    "sound": "audio sound music mixer alsa pulseaudio synthesizer midi player volume",
}


def _fake_apt_lists(directory, rng, per_section=40):
    packages, translations = [], []
    for section, words in _TOPICS.items():
        words = words.split()
        for i in range(per_section):
            name = f"{section}tool{i}x{rng.randrange(10**6)}"
            body = " ".join(
                rng.choice(words + [f"t{rng.randrange(500)}" for _ in range(6)]) for _ in range(30)
            )
            md5 = f"{rng.getrandbits(128):032x}"
            packages.append(f"Package: {name}\nSection: {section}\nDescription-md5: {md5}\n")
            translations.append(
                f"Package: {name}\nDescription-md5: {md5}\nDescription-en: {section} helper {i}\n"
                f" {name} is great. {body}\n .\n The {name} program, by {name} authors.\n"
            )
    prefix = "deb.example.org_debian_dists_testsuite"
    (directory / f"{prefix}_main_binary-amd64_Packages").write_text("\n".join(packages))
    (directory / f"{prefix}_main_i18n_Translation-en").write_text("\n".join(translations))
    (directory / f"{prefix}_InRelease").write_text(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\nSuite: testing\n"
        "Codename: testsuite\nVersion: 99\nDate: Thu, 01 Jan 2026 00:00:00 UTC\n"
        "-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n"
    )


def test_build_end_to_end_on_synthetic_lists(tmp_path):
    rng = random.Random()
    lists, out = tmp_path / "lists", tmp_path / "out"
    lists.mkdir()
    _fake_apt_lists(lists, rng)
    config = BuildConfig(
        num_sections=2,
        sections_sizes=(40, 10, 10),
        synopsis_sizes=(50, 10, 10),
        validation_fraction=0.2,
        test_fraction=0.2,
        min_words=5,
        bpe_vocab_size=400,
    )
    meta = build(str(lists), str(out), "testsuite", config)
    assert meta["release"]["Codename"] == "testsuite"
    labels = label_names("debian-sections", data_dir=str(out))
    assert len(labels) == 2 and set(labels) <= set(_TOPICS)
    ids_by_split = {}
    for split in SPLITS:
        rows = read_rows("debian-sections", split, data_dir=str(out))
        assert rows and {r["label"] for r in rows} <= set(labels)
        for row in rows:
            assert split_of(row["source"], config) == split
            assert not re.search(re.escape(row["package"]), row["text"], re.IGNORECASE)
        ids_by_split[split] = {r["id"] for r in rows}
    assert not ids_by_split["train"] & (ids_by_split["validation"] | ids_by_split["test"])
    synopsis = load_task("debian-synopsis", "train", data_dir=str(out))
    assert len(synopsis) <= 50 and all(s.endswith(tuple("0123456789")) for s in synopsis["summary"])
    assert (out / "synopsis-tokenizer.json").is_file()
    assert (out / "PROVENANCE.md").read_text() == render_provenance(meta)


def test_release_info_reads_signed_release(tmp_path):
    _fake_apt_lists(tmp_path, random.Random())
    info = release_info(str(next(tmp_path.glob("*_InRelease"))))
    assert info == {
        "Origin": "Debian",
        "Suite": "testing",
        "Codename": "testsuite",
        "Version": "99",
        "Date": "Thu, 01 Jan 2026 00:00:00 UTC",
    }


# --- the committed snapshot ----------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_committed_splits_match_meta_and_are_disjoint(task):
    meta = snapshot_meta()
    counts = meta["counts"][task]
    ids, sources = {}, {}
    for split in SPLITS:
        rows = read_rows(task, split)
        expected = sum(counts[split].values()) if isinstance(counts[split], dict) else counts[split]
        assert len(rows) == expected > 0
        ids[split] = {r["id"] for r in rows}
        assert len(ids[split]) == len(rows), "duplicate Description-md5 inside a split"
        sources[split] = {r["source"] for r in rows}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b]
        assert not sources[a] & sources[b]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_stable(task):
    config = BuildConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in snapshot_meta()["config"].items()}
    )
    for split in SPLITS:
        rows = read_rows(task, split, limit=200)
        assert all(split_of(r["source"], config) == split for r in rows)
        assert [r["id"] for r in read_rows(task, split, limit=50)] == [r["id"] for r in rows[:50]]


def test_no_package_name_leaks_into_classification_inputs():
    rng = random.Random()
    rows = [r for split in SPLITS for r in read_rows("debian-sections", split)]
    for row in rng.sample(rows, 800):
        names = names_to_mask(row["packages"])
        assert mask_names(row["text"], names) == row["text"], row["package"]
        for package in row["packages"]:
            assert not re.search(
                rf"(?<![A-Za-z0-9]){re.escape(package)}(?![A-Za-z0-9])", row["text"], re.IGNORECASE
            ), package


def test_label_set():
    labels = label_names("debian-sections")
    assert len(labels) == 20 == len(set(labels))
    assert labels == sorted(labels)
    for split in SPLITS:
        ds = load_task("debian-sections", split)
        assert ds.features["label"].names == labels
        assert set(ds["label"]) == set(range(20)), f"a section is missing from {split}"
    with pytest.raises(ValueError, match="no labels"):
        label_names("debian-synopsis")


def test_load_task_columns_limit_and_errors():
    ds = load_task("debian-synopsis", "validation", limit=7)
    assert len(ds) == 7 and set(ds.column_names) == {"id", "package", "source", "text", "summary"}
    assert all(t and s for t, s in zip(ds["text"], ds["summary"], strict=True))
    with pytest.raises(ValueError, match="task"):
        load_task("debian-everything", "train")
    with pytest.raises(ValueError, match="split"):
        load_task("debian-sections", "dev")
    with pytest.raises(TypeError, match="limit"):
        load_task("debian-sections", "train", limit=2.5)
    with pytest.raises(ValueError, match="limit"):
        load_task("debian-sections", "train", limit=-1)


def test_committed_files_are_deterministic_gzip_and_provenance_is_current():
    meta = snapshot_meta()
    path = f"{SNAPSHOT_DIR}/sections-validation.jsonl.gz"
    with open(path, "rb") as f:
        header = f.read(10)
    assert header[4:8] == b"\0\0\0\0", "gzip mtime must be 0 for reproducible bytes"
    with gzip.open(path, "rt") as f:
        json.loads(f.readline())
    with open(path.replace("sections-validation.jsonl.gz", "PROVENANCE.md")) as f:
        assert f.read() == render_provenance(meta)
