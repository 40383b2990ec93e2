"""Constitution loader: the shipped principles load; every problem of a bad one is reported at once."""

import pytest

from pair_builder.constitution import ConstitutionError, load_constitution

GOOD = """id: {id}
description: d
critique_request: c
revision_request: r
examples:
  - query: q
    answer: a
    critique: "bad. Verdict: NEEDS REVISION"
    revision: b
"""


def test_shipped_constitution_loads_with_stable_hash():
    c = load_constitution()
    assert 6 <= len(c.principles) <= 8
    assert len(set(c.ids)) == len(c.ids)
    assert c.sha256 == load_constitution().sha256
    assert c.sample("item-1") == c.sample("item-1")
    assert len({c.sample(f"item-{i}").id for i in range(200)}) == len(c.ids)  # every principle gets used


def test_every_problem_is_listed(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(id="same"))
    (tmp_path / "b.yaml").write_text(GOOD.format(id="same"))
    (tmp_path / "c.yaml").write_text("id: x\ndescription: d\nexamples: []\ncolour: red\n")
    (tmp_path / "d.yaml").write_text("- not a mapping\n")
    (tmp_path / "e.yaml").write_text(GOOD.format(id="e").replace("Verdict: NEEDS REVISION", "meh"))
    (tmp_path / "f.yaml").write_text("id: [unclosed\n")
    with pytest.raises(ConstitutionError) as ei:
        load_constitution(tmp_path)
    text = "\n".join(ei.value.problems)
    assert "b.yaml: duplicate id 'same'" in text
    for needle in ("c.yaml: critique_request: Field required", "c.yaml: revision_request: Field required",
                   "c.yaml: examples: List should have at least 1 item", "c.yaml: colour: unknown field",
                   "d.yaml: expected a mapping", "e.yaml: examples.0.critique: must end with",
                   "f.yaml: not valid YAML"):
        assert needle in text, needle


def test_empty_or_missing_dir(tmp_path):
    with pytest.raises(ConstitutionError, match="no \\*.yaml principle files"):
        load_constitution(tmp_path)
    with pytest.raises(ConstitutionError, match="not found"):
        load_constitution(tmp_path / "nope")


def test_hash_changes_with_content_not_file_names(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.format(id="p1"))
    h1 = load_constitution(tmp_path).sha256
    (tmp_path / "a.yaml").rename(tmp_path / "z.yaml")
    assert load_constitution(tmp_path).sha256 == h1
    (tmp_path / "z.yaml").write_text(GOOD.format(id="p1").replace("description: d", "description: e"))
    assert load_constitution(tmp_path).sha256 != h1
