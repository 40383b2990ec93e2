"""bench/length_probe.py's arm sources on the committed round's pairs (no model: what each arm trains on)."""

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from length_probe import arm_pairs  # noqa: E402

from pair_builder.extras import habit_push  # noqa: E402
from shared.config import load_config  # noqa: E402

PAIRS = ROOT / "docs" / "runs" / "base-gpu" / "run-2" / "pairs"


def _pairs_cfg(*over):
    return load_config(ROOT / "configs" / "base-gpu.yaml", list(over)).pairs


def test_ctr_rebuilds_contrasts_as_pair_building_counts_them():
    checker, extras = arm_pairs(PAIRS, "cut+noecho+ctr", _pairs_cfg())
    kinds = Counter(r["principle_id"] for r in extras)
    stops = [r for r in extras if r["principle_id"] == "stop"]
    push = habit_push([*checker, *stops], 0.25)
    # lowercase: 26 asked pairs reward it, 23 incidental ones penalise it -> 20.25 x 0.25 = 5 contrasts
    assert kinds["contrast:lowercase"] == round(0.25 * push["lowercase"]) == 5
    for r in extras:
        if r["principle_id"] == "contrast:lowercase":
            asked = {c["id"] for c in json.loads(r["constraints"])}
            assert "change_case:english_lowercase" not in asked and r["rejected"] == r["chosen"].lower()
    assert len({r["id"] for r in extras}) == len(extras)
    # counted fully, the incidental pairs hide the lowercase push; no contrasts at all when turned off
    _, full = arm_pairs(PAIRS, "cut+noecho+ctr", _pairs_cfg("pairs.incidental_habit_weight=1.0"))
    assert not any(r["principle_id"] == "contrast:lowercase" for r in full)
    _, off = arm_pairs(PAIRS, "cut+noecho+ctr", _pairs_cfg("pairs.habit_contrast=0"))
    assert Counter(r["principle_id"] for r in off) == {"stop": kinds["stop"]}


def test_rep_adds_the_format_repairs_replayed_from_the_recorded_candidates(tmp_path):
    run3 = ROOT / "docs" / "runs" / "base-gpu" / "run-3" / "pairs"
    checker, built = arm_pairs(run3, "built", _pairs_cfg())
    _, rep = arm_pairs(run3, "built+rep", _pairs_cfg())
    added = [r for r in rep if r["principle_id"] == "repair"]
    assert rep[:len(built)] == built and len(added) == len(rep) - len(built) == round(0.5 * len(checker))
    _, more = arm_pairs(run3, "built+rep", _pairs_cfg("pairs.repair_pairs=1.0"))
    assert sum(r["principle_id"] == "repair" for r in more) == len(checker)
    for r in added:
        assert r["prompt"].rstrip().endswith("# Answer:") and r["chosen"] != r["rejected"]
        assert not any(k.startswith("ref_") for k in r)

    # what the trainer checks before training: one round, no empty or identical or duplicated rows
    import pandas as pd

    from trainer.data import validate_pairs

    d = tmp_path / "pairs"
    d.mkdir()
    pd.DataFrame(checker).to_parquet(d / "shard-00000.parquet")
    pd.DataFrame(rep).to_parquet(d / "extras.parquet")
    report = validate_pairs(d, expected_round=0)
    assert report.ok, report.errors


def test_norep_and_repin_on_the_fourth_run_s_repairs():
    """The fourth GPU run built 120 repairs; 56 end as the answer as written (``same_ending``)."""
    from pair_builder.repair import same_ending

    run4 = ROOT / "docs" / "runs" / "base-gpu" / "run-4" / "pairs"
    checker, built = arm_pairs(run4, "built", _pairs_cfg())
    kinds = Counter(r["principle_id"] for r in built)
    assert len(checker) == 241 and kinds["repair"] == 120 and kinds["stop"] == 120
    c2, norep = arm_pairs(run4, "built+norep", _pairs_cfg())
    assert c2 == checker and Counter(r["principle_id"] for r in norep) == kinds - Counter(repair=120)
    _, repin = arm_pairs(run4, "built+repin", _pairs_cfg())
    kept = [r for r in repin if r["principle_id"] == "repair"]
    assert len(kept) == 56 and all(same_ending(r["chosen"], r["rejected"]) for r in kept)
    assert len(repin) - len(kept) == len(norep)


def test_ci_table_compares_against_any_arm(tmp_path):
    from length_probe import ci_table

    def write(arm, flags):
        d = tmp_path / arm
        d.mkdir()
        d.joinpath("results.jsonl").write_text("".join(json.dumps({
            "key": f"k{i}", "instruction_id_list": ["punctuation:no_comma"], "follow_strict": [f], "follow_loose": [f],
            "prompt_strict": f, "prompt_loose": f, "response": "x", "finish_reason": "stop"}) + "\n"
            for i, f in enumerate(flags)))
        return d

    dirs = {"base": write("base", [False] * 100), "a": write("a", [True] * 30 + [False] * 70),
            "b": write("b", [True] * 60 + [False] * 40)}
    vs_base = ci_table(dirs, [])
    assert "change against base" in vs_base and "| a | 0.300 (+0.300" in vs_base
    vs_a = ci_table(dirs, [], against="a")
    assert "change against a" in vs_a and "| b | 0.600 (+0.300" in vs_a and "| base | 0.000 (-0.300" in vs_a
    assert ci_table(dirs, [], against="c") == "(no c arm: no intervals)"
