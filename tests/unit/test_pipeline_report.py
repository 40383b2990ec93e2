"""The run report shows degeneration, guard verdicts, held-out types and IFEval by type per round."""

import json

from pipeline.report import write_report
from pipeline.state import RunState
from tests.unit.test_pipeline_decide import _guarded_eval, _setup, base_dir  # noqa: F401 (fixture)


def _add_by_instruction(rd, k, score):
    p = rd.round(k, create=False).eval / "scores.json"
    s = json.loads(p.read_text())
    s.update(n_prompts=100, suite="own", by_instruction={
        "keywords": {"strict": score, "loose": score, "count": 100},
        "keywords:existence": {"strict": score, "loose": score, "count": 100},
        "startend:quotation": {"strict": 0.5, "loose": 0.5, "count": 25}})
    p.write_text(json.dumps(s))


def test_report_per_round_measures(tmp_path, base_dir):  # noqa: F811
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, heldout=0.4)
    _guarded_eval(rd, 1, 0.5, heldout=0.6)
    _guarded_eval(rd, 2, 0.7, heldout=0.6, loop=0.2)
    for k, sc in ((0, 0.2), (1, 0.5), (2, 0.7)):
        _add_by_instruction(rd, k, sc)
    state = RunState(rd.path)
    state.stop("guard failed: ...", round=2, promoted=str(rd.round(0).merged))
    md = write_report(cfg, rd, state).read_text()
    assert "## Degeneration by round" in md and "| 0 | 0.000 | 0.000 |" in md
    assert "| baseline |" in md and "| pass |" in md and "FAIL: loop_rate 0.200 vs 0.000 in round 0" in md
    assert "## Held-out instruction types by round" in md and "| 1 | 0.6000 | 0.6000 | +0.2000 | 25 |" in md
    assert "## IFEval by instruction type and round (loose)" in md
    assert "| startend:quotation (held out) | 0.500 | 0.500 | 0.500 | 25 |" in md
    assert "| keywords:existence | 0.200 | 0.500 | 0.700 | 100 |" in md
    assert (rd.path / "degeneration_by_round.png").stat().st_size > 1000
    html = (rd.path / "report.html").read_text()
    assert "Degeneration by round" in html and html.count("data:image/png;base64") >= 2


def test_report_training_kl_heldout_accuracy_and_example_pairs(tmp_path, base_dir):  # noqa: F811
    import pandas as pd

    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, heldout=0.4)
    _add_by_instruction(rd, 0, 0.2)
    for k, (start, after, acc) in enumerate([(0.0, 0.012, 0.71), (0.012, 0.025, 0.66)]):
        r = rd.round(k)
        r.adapter.mkdir(parents=True)
        (r.adapter / "train_summary.json").write_text(json.dumps({
            "status": "completed", "train_pairs": 90, "eval_pairs": 10, "global_step": 12, "start_kl_to_base": start,
            "metrics": {"eval_rewards/accuracies": acc, "eval_rewards/margins": 0.3}}))
        r.merged.mkdir(parents=True)
        (r.merged / "merge_report.json").write_text(json.dumps({"adapter_effect_kl": after}))
        r.pairs.mkdir(parents=True)
        pd.DataFrame([{"prompt": f"# Instructions\n\n# Query:\nWrite poem {i}.\n\n# Answer:\n", "chosen": f"ok {i}",
                       "rejected": "x" * 900, "constraints": "[]", "chosen_passed": 1, "rejected_passed": 0}
                      for i in range(5)]).to_parquet(r.pairs / "shard-00000.parquet")
    state = RunState(rd.path)
    md = write_report(cfg, rd, state).read_text()
    assert "## Training by round" in md
    assert "| 0 | 90 | 10 | 12 | completed | 0 | 0.012 | 0.710 | 0.300 |" in md
    assert "| 1 | 90 | 10 | 12 | completed | 0.012 | 0.025 | 0.660 | 0.300 |" in md
    assert md.count("## Example pairs, round") == 2 and md.count("INSTRUCTION: Write poem") == 6
    assert "CHOSEN (passes 1):" in md and "[... 300 more chars]" in md
    assert "<pre>INSTRUCTION: Write poem" in (rd.path / "report.html").read_text()
