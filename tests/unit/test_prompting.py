import pytest

from shared.prompting import load_template


def test_default_template_renders_few_shot_prompt():
    t = load_template()
    p = t.render("  List three fruits.  ")
    assert p.startswith("# Instructions")
    assert p.count("# Query:") == len(t.examples) + 1
    assert p.endswith("# Query:\nList three fruits.\n\n# Answer:\n")
    # a model that runs on into a new example must hit a stop string
    assert "\n# Query:" in t.stop


def test_hash_changes_with_content(tmp_path):
    t = load_template()
    other = t.model_copy(update={"preamble": t.preamble + "x"})
    assert t.sha256 != other.sha256 and len(t.sha256) == 64


def test_bad_template_lists_problems(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("id: x\npreamble: hi\nstop: []\nexamples: [{query: q}]\n")
    with pytest.raises(ValueError) as ei:
        load_template(p)
    msg = str(ei.value)
    assert "query_prefix" in msg and "stop" in msg and "examples.0.answer" in msg
