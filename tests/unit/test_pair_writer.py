"""Writer exactly-once (done log, shards, crash between them), manifest refusal, stats/plots/card."""

import json

import datasets
import pyarrow.parquet as pq
import pytest

from pair_builder.report import compute_stats, write_report
from pair_builder.writer import OutputMismatch, PairWriter

MANIFEST = {"model": "m", "model_revision": "r1", "constitution_sha256": "c1", "template_sha256": "t1",
            "sampling": {"k": 2}, "round": 0}


def kept(i, **extra):
    rec = {"id": f"id{i}", "prompt": "P\n", "chosen": f"good {i}", "rejected": f"bad {i}", "instruction_id": f"ins{i}",
           "constraints": "[]", "principle_id": "p", "chosen_passed": 1, "rejected_passed": 0, "model": "m",
           "round": 0, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}
    return {"id": f"id{i}", "kept": True, "reason": None, "route": "rewrite", "n_constraints": 1, "record": rec,
            "error": None, "chosen_passed": 1, "rejected_passed": 0, "chosen_chars": 6, "rejected_chars": 5,
            "sample_passed": [0, 0], "rewrite_passed": [1], "usage": {"requests": 4, "prompt_tokens": 40}, **extra}


def dropped(i, reason="no_margin"):
    return {"id": f"d{i}", "kept": False, "reason": reason, "route": None, "n_constraints": 1, "record": None,
            "error": None, "sample_passed": [1, 1], "rewrite_passed": [], "usage": {"requests": 1}}


def test_shards_done_log_and_exactly_once(tmp_path):
    w = PairWriter(tmp_path, MANIFEST, shard_size=2)
    for i in range(3):
        w.add(kept(i))
    w.add(dropped(0))
    w.add({"id": "e0", "kept": False, "reason": "request_error", "error": "boom"})  # not done: retried next run
    w.add(kept(0))  # a retried task that finished twice
    assert len(w.shards()) == 1 and w.kept_count == 3
    w.flush()
    assert [p.name for p in w.shards()] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not w.is_done("e0") and w.is_done("d0") and w.is_done("id2")
    w2 = PairWriter(tmp_path, MANIFEST, shard_size=2)  # a resubmission
    assert len(w2.done) == 4 and w2.kept_count == 3
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path), split="train")
    assert sorted(ds["id"]) == ["id0", "id1", "id2"] and ds[0]["ref_chosen_logps"] == -1.5


def test_crash_after_shard_before_done_entries(tmp_path):
    w = PairWriter(tmp_path, MANIFEST, shard_size=10)
    w.add(kept(0))
    w.flush()
    (w.meta / "done.jsonl").write_text("")  # the done entries were lost in a crash
    w2 = PairWriter(tmp_path, MANIFEST, shard_size=10)
    assert not w2.is_done("id0")
    w2.add(kept(0))  # the redone item
    w2.flush()
    assert len(w2.shards()) == 1 and w2.is_done("id0")  # recognised, not written twice


def test_refuses_another_models_pairs(tmp_path):
    PairWriter(tmp_path, MANIFEST)
    with pytest.raises(OutputMismatch, match="model_revision.*Refusing to mix"):
        PairWriter(tmp_path, {**MANIFEST, "model_revision": "r2"})
    with pytest.raises(OutputMismatch, match="constitution_sha256"):
        PairWriter(tmp_path, {**MANIFEST, "constitution_sha256": "c2"})
    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "shard-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputMismatch, match="no manifest"):
        PairWriter(stray, MANIFEST)


def test_no_ref_columns_when_disabled(tmp_path):
    w = PairWriter(tmp_path, MANIFEST, ref_logprobs=False)
    w.add(kept(0))
    w.flush()
    assert "ref_chosen_logps" not in pq.read_schema(w.shards()[0]).names


def test_stats_add_up_and_report_files(tmp_path):
    entries = [kept(0), kept(1, route="sample"), dropped(0), dropped(1, "too_similar"), dropped(2)]
    s = compute_stats(entries)
    assert s["kept"] + sum(s["drop_reasons"].values()) == s["items_done"] == 5
    assert s["drop_reasons"] == {"no_margin": 2, "too_similar": 1} and s["chosen_route"] == {"rewrite": 1, "sample": 1}
    assert s["pass_rate"]["chosen"] == 1.0 and s["pass_rate"]["rejected"] == 0.0 and s["pass_rate"]["samples"] == 0.6
    info = {"run": "r", "round": 0, "model": "m", "model_revision": "r1", "constitution": "c", "constitution_sha256": "c" * 64,
            "principles": 7, "template_id": "t", "template_sha256": "t" * 64, "ref_logprobs": True,
            "sampling": {"k": 2, "temperature": 0.8, "top_p": 0.9, "max_tokens": 9, "revisions": 1,
                         "critique_temperature": 0.3, "seed": 0},
            "no_constraint_rule": "drop", "servers": "u", "instructions": 5, "sources": "seed", "usd_per_hour": 1.74,
            "cost_usd": 0.01, "cost_per_pair": 0.005}
    meta = tmp_path / ".meta"
    write_report(tmp_path, meta, entries, info, [3, 4, 5])
    for name in ("stats.json", "lengths.png", "pass_rates.png", "drop_reasons.png", "instruction_lengths.png"):
        assert (meta / name).stat().st_size > 0, name
    card = (tmp_path / "README.md").read_text()
    assert "| no_margin | 2 |" in card and "acceptance 40.0%" in card and "sha256 `cccccccccccccccc`" in card
    assert json.loads((meta / "stats.json").read_text())["kept"] == 2


def test_disk_full_mid_shard_keeps_earlier_shards_and_redoes_the_rest(tmp_path, monkeypatch, capfd):
    import errno

    import pair_builder.writer as writer_mod
    from pair_builder.__main__ import main

    w = PairWriter(tmp_path, MANIFEST, shard_size=2)
    w.add(kept(0))
    w.add(kept(1))  # shard 0 written
    first = (tmp_path / "shard-00000.parquet").read_bytes()
    real = writer_mod.atomic_write_bytes

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer_mod, "atomic_write_bytes", full)
    w.add(kept(2))
    with pytest.raises(OSError):
        w.add(kept(3))  # shard 1 cannot be written
    assert [p.name for p in w.shards()] == ["shard-00000.parquet"]
    assert (tmp_path / "shard-00000.parquet").read_bytes() == first and not list(tmp_path.glob("*.tmp*"))
    monkeypatch.setattr(writer_mod, "atomic_write_bytes", real)
    again = PairWriter(tmp_path, MANIFEST, shard_size=2)  # the resubmission
    assert again.is_done("id0") and again.is_done("id1") and not again.is_done("id2") and not again.is_done("id3")

    # and the CLI says so in one line, exit 1
    def run_full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/round-0/pairs/shard-00001.parquet")

    monkeypatch.setattr("pair_builder.__main__.run", run_full)
    capfd.readouterr()  # only what main says (a handler an earlier test left on a closed stream may have spoken)
    assert main([]) == 1
    err = capfd.readouterr().err
    assert "could not write runs/x/round-0/pairs/shard-00001.parquet: No space left on device" in err
    assert "Traceback" not in err
