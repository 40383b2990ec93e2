import os

import pytest

from shared.atomic import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["f.txt"]


def test_failed_write_keeps_old_content(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("shared.atomic.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(p, {"a": 2})
    assert p.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["f.json"]  # the temp file was cleaned up


def test_atomic_dir_success_and_failure(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "w").write_text("v1")
        assert not target.exists()  # invisible until complete
    assert (target / "w").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "w").write_text("half")
            raise RuntimeError("crash mid-build")
    assert (target / "w").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_dir(target) as d:
        (d / "w").write_text("v2")
    assert (target / "w").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_jsonl_torn_last_line_is_skipped(tmp_path):
    p = tmp_path / "l.jsonl"
    append_jsonl(p, {"i": 1})
    append_jsonl(p, {"i": 2})
    with open(p, "ab") as f:
        f.write(b'{"i": 3, "tru')  # a crash in the middle of a write
    assert read_jsonl(p) == [{"i": 1}, {"i": 2}]


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"i": 1}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)
