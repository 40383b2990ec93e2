"""Extra pairs (pair_builder.extras): stop pairs, habit contrasts, their selection over a round, the file."""

import json

import pyarrow.parquet as pq
import pytest

from pair_builder.build import BuildSettings, build_item
from pair_builder.extras import (
    EXTRAS_FILE,
    contrasts,
    cut_loop,
    extras_counts,
    extras_summary,
    habit_push,
    rewarded_habits,
    select_extras,
    stop_pair,
    write_extras,
)
from pair_builder.sample import Candidate
from pair_builder.sources import Instruction
from pair_builder.verify import Relevance
from pair_builder.writer import pair_schema
from shared.records import Constraint, PairRecord
from tests.unit.test_pair_build import PRINCIPLE, SETTINGS, TEMPLATE, FakeClient

PROSE = ("The sea is wide and deep, and it covers most of the Earth. Tides rise and fall twice a day, pulled by "
         "the Moon, and the water is salty because rivers carry minerals into it.")


def cand(text, passed=(), problem=None, route="sample", overlap=None):
    return Candidate(text=text, route=route, finish_reason="stop", passed=list(passed), problem=problem,
                     overlap=overlap)


def test_stop_pair_prefers_a_finished_answer_over_a_loop_cut_at_its_first_repeat():
    cs = [cand("The sea is wide. " + "The sea is deep. " * 50, [True], "looping"), cand("Short.", [True]),
          cand(PROSE, [True]), cand("A wave. " * 60, [True], "truncated"),
          cand(PROSE + " And then", [False], "truncated")]
    # "Short." is too short; the loop is cut just past its first repeat: DPO sees "starting to repeat", not 300
    # tokens against 25 (which it learns as "be short"). A loop that ran to the token limit counts; a truncated
    # answer that does not loop makes no stop pair.
    assert stop_pair(cs) == (2, 0, "The sea is wide. The sea is deep. The sea is deep.", [True])
    # the finished answer must pass every constraint the cut loop passes; against it, the loop passing fewest
    cs[2].passed = [False]
    assert stop_pair(cs) is None
    cs[3].passed = [False]
    assert stop_pair(cs) == (2, 3, "A wave. A wave.", [False])
    # the constraints of the cut text, when a checker is given
    assert stop_pair(cs, check=lambda t: [t.count("wave") == 2])[:2] == (2, 0)
    # not an irrelevant answer, and not a copy / leak (any problem)
    assert stop_pair(cs, relevance=Relevance(min_overlap=0.5))[:2] == (2, 3)
    cs[2].overlap = 0.1
    assert stop_pair(cs, relevance=Relevance(min_overlap=0.5)) is None
    assert stop_pair([cand(PROSE, [True], "copies_example"), cand("x y " * 30, [False], "looping")]) is None
    # an all-lowercase finished answer against a cased loop would teach lowercase too
    assert stop_pair([cand(PROSE.lower()), cand(PROSE + " Again and again. " * 20, (), "looping")]) is None


def test_cut_loop_on_real_loops():
    # rejected answers of the first GPU round's stop pairs (gemma3-270m, truncated at 384 tokens)
    real = ("I will help you with your homework.\nhttps://en.wikipedia.org/wiki/Haiku_challenge\n" * 12,
            "Life cycle of a butterfly - in the middle of the paper\n" * 20)
    cut = [cut_loop(cand(t, (), "truncated"))[0] for t in real]
    assert cut == [("I will help you with your homework.\nhttps://en.wikipedia.org/wiki/Haiku_challenge\n" * 2).strip(),
                   "Life cycle of a butterfly - in the middle of the paper\n"
                   "Life cycle of a butterfly - in the middle of the paper"]
    assert cut_loop(cand(PROSE, (), "truncated")) is None and cut_loop(cand(PROSE)) is None


def test_stop_pair_chosen_says_nothing_twice():
    # a real stop-pair chosen replayed from the first GPU round's candidates (gemma3-270m): a loop too short
    # for is_looping's word floor, against a long loop - it would teach "say it three times, then stop"
    loop = "I sleep well. " * 40
    assert stop_pair([cand("I sleep well, I sleep well, I sleep well."), cand(loop, (), "looping")]) is None
    assert stop_pair([cand("Sleep well. Go to bed early.\nSleep well."), cand(loop, (), "looping")]) is None
    assert stop_pair([cand(PROSE), cand(loop, (), "looping")]) == (0, 1, "I sleep well. I sleep well.", [])


def test_contrasts_apply_only_unrequested_habits_the_text_lacks():
    c = contrasts(PROSE, ())
    assert set(c) == {"lowercase", "uppercase", "no_comma"}
    assert c["lowercase"] == PROSE.lower() and c["uppercase"] == PROSE.upper()
    assert "," not in c["no_comma"] and "wide and deep and it covers" in c["no_comma"]
    assert set(contrasts(PROSE, ["change_case:english_lowercase", "punctuation:no_comma"])) == {"uppercase"}
    assert "lowercase" not in contrasts(PROSE.lower(), ())  # already shows it: nothing to contrast
    assert "no_comma" not in contrasts("Yes, fine.", ())  # too short to tell a comma habit


def test_rewarded_habits():
    assert rewarded_habits(PROSE.lower(), PROSE) == ["lowercase"]
    assert rewarded_habits(PROSE.replace(",", ""), PROSE) == ["no_comma"]
    assert rewarded_habits(PROSE, PROSE.lower()) == []


LOWER_TASK = Instruction(id="i1", task="Describe the sea.", text="Describe the sea. Answer in lowercase only.",
                         constraints=(Constraint(id="change_case:english_lowercase"),))
FREE_TASK = Instruction(id="i2", task="Describe the sea.", text="Describe the sea. Mention tides.",
                        constraints=(Constraint(id="keywords:existence", kwargs={"keywords": ["tides"]}),))
ON = BuildSettings(**{**SETTINGS.__dict__, "stop_pairs": True, "habit_contrast": True})


def test_build_item_collects_contrasts_with_ref_logps_in_one_request():
    fc = FakeClient([PROSE, "The sea is big and blue, and it covers most of the Earth. The water is salty because rivers carry minerals."], revision=PROSE + " Tides matter.")
    res = build_item(fc, FREE_TASK, PRINCIPLE, settings=ON, template=TEMPLATE)
    assert res["kept"]
    kinds = [x["kind"] for x in res["extras"]]
    assert kinds == ["contrast:lowercase", "contrast:uppercase", "contrast:no_comma"]
    chosen = res["record"]["chosen"]
    for x in res["extras"]:
        rec = PairRecord.model_validate(x["record"])
        assert rec.chosen == chosen and rec.rejected != chosen and rec.principle_id == x["kind"]
        assert rec.ref_chosen_logps == res["record"]["ref_chosen_logps"] and rec.ref_rejected_logps < 0
        assert rec.id != res["id"]
    echo = [c for c in fc.calls if c.get("echo")]
    assert len(echo) == 1 and len(echo[0]["prompt"]) == 1 + 2 + 3  # prompt, the pair, three contrasts
    off = build_item(FakeClient([PROSE, "The sea is big and blue, and it covers most of the Earth. The water is salty because rivers carry minerals."], revision=PROSE + " Tides matter."), FREE_TASK,
                     PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert "extras" not in off


def test_build_item_keeps_a_stop_pair_when_the_checker_pair_is_dropped():
    class Looping(FakeClient):
        def create(self, **kw):
            resp = super().create(**kw)
            if not kw.get("echo") and kw.get("n"):
                resp.choices[1].finish_reason = "length"
            return resp

    fc = Looping([PROSE, "The sea, the sea, " * 40], revision=PROSE)
    res = build_item(fc, FREE_TASK, PRINCIPLE, settings=ON, template=TEMPLATE)
    assert not res["kept"]
    [stop] = [x for x in res["extras"] if x["kind"] == "stop"]
    assert stop["record"]["chosen"] == PROSE and stop["record"]["rejected"] == "The sea, the sea,"


def _entry(iid, kept_record=None, extras=()):
    return {"id": iid, "kept": kept_record is not None,
            "extras": [{"kind": k, "record": {"id": "x", "prompt": "p", "chosen": c, "rejected": r,
                                                "principle_id": k}} for k, c, r in extras]}


def test_select_extras_balances_each_rewarded_habit():
    records = {f"l{i}": {"id": f"l{i}", "chosen": PROSE.lower(), "rejected": PROSE} for i in range(3)}
    records.update({f"n{i}": {"id": f"n{i}", "chosen": PROSE, "rejected": "Bad."} for i in range(10)})
    entries = [_entry(i) for i in records]
    entries += [_entry(f"n{i}", records[f"n{i}"], [("contrast:lowercase", PROSE, PROSE.lower()),
                                                    ("contrast:uppercase", PROSE, PROSE.upper())]) for i in range(10)]
    entries += [_entry(f"d{i}", None, [("stop", PROSE, "Loop, Loop, " * 20), ("contrast:lowercase", PROSE, "x")])
                for i in range(8)]
    out = select_extras(entries, records, habit_contrast=1.0, stop_pairs=0.5, seed=0)
    kinds = [r["principle_id"] for r in out]
    # 3 pairs reward lowercase -> 3 contrasts; none rewards uppercase -> none; stops: 0.5 x 13 checker pairs
    assert kinds.count("contrast:lowercase") == 3 and kinds.count("contrast:uppercase") == 0
    assert kinds.count("stop") == 6
    assert all(r["rejected"] != "x" for r in out)  # a contrast of a dropped item has no checker pair behind it
    assert len({r["id"] for r in out}) == len(out)
    assert out == select_extras(entries, records, habit_contrast=1.0, stop_pairs=0.5, seed=0)  # reruns agree
    # contrasts fill the gap between the pairs that push a habit up and those that push it down
    records["down"] = {"id": "down", "chosen": PROSE, "rejected": PROSE.lower()}
    kinds = [r["principle_id"] for r in select_extras(entries, records, habit_contrast=1.0, stop_pairs=0.0)]
    assert kinds.count("contrast:lowercase") == 2
    # none of these instructions asked for lowercase: at a weight of 0.25, 3 - 1 incidental pairs make no contrast
    kinds = [r["principle_id"] for r in select_extras(entries, records, habit_contrast=1.0, stop_pairs=0.0,
                                                      incidental_weight=0.25)]
    assert kinds.count("contrast:lowercase") == 0
    assert select_extras(entries, records, habit_contrast=0.0, stop_pairs=0.0) == []
    summary = extras_summary(entries, records, out, habit_contrast=1.0, stop_pairs=0.5)
    assert summary["rewarded_habits"] == {"lowercase": 3} and summary["written"]["stop"] == 6
    assert summary["candidates"] == {"contrast:lowercase": 18, "contrast:uppercase": 10, "stop": 8}


def test_write_extras_is_the_shards_schema_and_removed_when_empty(tmp_path):
    schema = pair_schema(ref_logprobs=False)
    rows = [PairRecord(id=f"e{i}", prompt="p", chosen="a", rejected="b", instruction_id="i", principle_id="stop",
                       chosen_passed=0, rejected_passed=0, model="m", round=0).model_dump() for i in range(2)]
    path = write_extras(tmp_path, rows, schema)
    assert path == tmp_path / EXTRAS_FILE and pq.read_schema(path).names == schema.names
    assert extras_counts(tmp_path) == {"stop": 2}
    assert write_extras(tmp_path, [], schema) is None and not path.exists() and extras_counts(tmp_path) == {}


@pytest.mark.parametrize("text", ["", "   "])
def test_stop_pair_ignores_empty_degenerate_candidates(text):
    assert stop_pair([cand(PROSE), cand(text, (), "truncated")]) is None


def test_audit_replays_the_extras_of_a_recorded_round(tmp_path):
    import json

    from pair_builder.audit import main, replay_extras

    cons = [{"id": "change_case:english_lowercase", "kwargs": {}}]
    rec = PairRecord(id="k", prompt="p", chosen=PROSE.lower(), rejected=PROSE, instruction_id="i",
                     constraints=json.dumps(cons), principle_id="p1", chosen_passed=1, rejected_passed=0,
                     model="m", round=0).model_dump()
    write_extras(tmp_path, [rec], pair_schema(ref_logprobs=False))
    (tmp_path / EXTRAS_FILE).rename(tmp_path / "shard-00000.parquet")

    def c(text, passed, problem=None, finish="stop"):
        return {"text": text, "route": "sample", "finish_reason": finish, "parent": None, "pass_no": 0,
                "critique": None, "verdict": None, "passed": passed, "problem": problem, "overlap": None}

    rows = [{"id": "k", "instruction": "Describe the sea in lowercase.", "constraints": cons, "chosen": 0,
             "rejected": 1, "candidates": [c(PROSE.lower(), [True]), c(PROSE, [False])]},
            {"id": "d", "instruction": "Describe the sea.", "constraints": [], "chosen": None, "rejected": None,
             "candidates": [c(PROSE, []), c("Tides, " * 40, [], "truncated", "length")]}]
    (tmp_path / ".meta").mkdir()
    (tmp_path / ".meta" / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = replay_extras(tmp_path, habit_contrast=1.0, stop_pairs=1.0)
    # one checker pair rewards lowercase where asked, and the stop pair pushes no habit; but no kept item offers a
    # lowercase contrast (its chosen is lowercase), so that gap stays open and the table shows it. Its other
    # contrasts close no gap: none is taken.
    assert res["candidates"] == {"stop": 1, "contrast:uppercase": 1, "contrast:no_comma": 1}
    assert res["extras"] == {"stop": 1}
    assert res["balance_pairs"]["lowercase"]["asked_up"] == 1
    assert res["balance_with_extras"]["lowercase"] == {"asked_up": 1, "asked_down": 0, "unasked_up": 0,
                                                       "unasked_down": 0}
    assert main([str(tmp_path), "--replay-extras", "--stop-pairs", "1"]) == 0


def test_habit_push_counts_asked_pairs_fully_and_incidental_ones_at_their_weight():
    asked = json.dumps([{"id": "change_case:english_lowercase", "kwargs": {}}])
    rows = [{"chosen": PROSE.lower(), "rejected": PROSE, "constraints": asked}] * 4  # asked: up
    rows += [{"chosen": PROSE, "rejected": PROSE.lower(), "constraints": "[]"}] * 4  # not asked: down
    assert habit_push(rows, 1.0)["lowercase"] == 0  # looks balanced when every difference counts alike
    assert habit_push(rows, 0.25)["lowercase"] == 3.0
    assert habit_push(rows, 0.0)["lowercase"] == 4.0 and habit_push(rows, 0.0)["uppercase"] == 0
