"""Degeneration measures on real-looking responses: loops vs lists and refrains, habits only where unasked."""

import pytest

from eval.degeneration import distinct_n, flat, is_looping, profile, quantile, repeats_sentence, summarize, words

SHAKER_LOOP = ("Here are some fun ideas for ice cubes at a party:\n"
               "* ice cube in the shape of a star\n* ice cube in the shape of a heart\n"
               + "* ice cube in the shape of a shaker\n" * 25 + "* ice cube in the shape of a sha")
NUMBERED_LOOP = "Steps to make tea:\n" + "".join(f"{i}. Boil the water and pour it into the cup.\n" for i in range(1, 30))
SENTENCE_LOOP = "The best way to learn is to practice. " + "You should practice every day. " * 20
PARAGRAPH_LOOP = ("Dear team, thank you for the meeting. " + ("We agreed that the launch moves to the second week "
                  "of May because the supplier needs more time for the new parts, and that marketing will "
                  "prepare a short note for customers explaining the delay and the reasons behind it in plain "
                  "words, with a new date and a contact person for questions. ") * 4)
WORD_LOOP = "The answer is is is is is is is is is is is is is is is is is is"

BULLETS = """Here are some tips for a good night's sleep:
* Use a regular schedule, going to bed and waking up at the same time every day.
* Use blackout curtains so the room stays dark in the early morning.
* Use earplugs or a white-noise machine if the street is loud.
* Avoid caffeine after lunch, since it stays in your body for hours.
* Keep the bedroom cool, around 18 degrees, and the bed for sleeping only.
* Put the phone in another room; the light and the notifications keep the brain awake."""

REFRAIN_POEM = """The river runs beneath the hill,
and every stone remembers still.
Oh, carry me home, carry me home.

The swallows turn above the mill,
the evening air is soft and still.
Oh, carry me home, carry me home.

The lanterns glow on the window sill,
the children sleep, the night is chill.
Oh, carry me home, carry me home.

And when the morning comes to fill
the valley with its gold, I will
sing carry me home, carry me home, carry me home."""

VERSES = ["Walking down the river road alone,\nthinking of the house I used to own,\n"
          "the wind is cold, the sky is grey,\nbut I will find my way some day.",
          "The city lights are fading now,\nI made a promise, kept a vow,\n"
          "and every mile behind my back\nis one more step along the track.",
          "So if you see me passing through,\nremember all we said and knew,\n"
          "the morning comes for everyone,\nand every road leads to the sun."]
CHORUS = ("Oh hold on, hold on to the light,\nwe will be dancing through the night,\n"
          "hold on, hold on, it will be all right,\nhold on to me and hold on tight.")
SONG = "\n\n".join(f"Verse {i}:\n{v}\n\nChorus:\n{CHORUS}" for i, v in enumerate(VERSES, 1))

ESSAY = ("Tides are the regular rise and fall of the sea. They are caused mainly by the gravity of the Moon, "
         "which pulls the water on the near side of the Earth towards it, and by the rotation of the Earth. "
         "The Sun also plays a part: when the Sun and the Moon line up, at new and full moon, the tides are "
         "higher than usual; these are called spring tides. When they are at right angles the tides are weaker.")


# seen in a base model's IFEval answers after one round: symbol lines the word-based rules cannot see
SYMBOL_LOOP = "India\nChina\n" + "*******\n" * 30
DASH_LOOP = "Clarissa is a new employee. She is responsible for the following:\n" + "-\n" * 40


@pytest.mark.parametrize("text", [SHAKER_LOOP, NUMBERED_LOOP, SENTENCE_LOOP, PARAGRAPH_LOOP, WORD_LOOP, SYMBOL_LOOP,
                                  DASH_LOOP])
def test_loops_are_loops(text):
    assert is_looping(text)


@pytest.mark.parametrize("text", [BULLETS, REFRAIN_POEM, SONG, ESSAY, "Yes yes yes yes.", "",
                                  "A\n***\nB\n***\nC\n***\nD", "Title\n-\n-\n-"])
def test_lists_poems_and_prose_are_not_loops(text):
    assert not is_looping(text)


def test_two_responses_separated_is_not_a_loop():
    # combination:two_responses asks for (nearly) the same answer twice
    assert not is_looping(ESSAY + "\n******\n" + ESSAY)


def test_words_and_distinct_n():
    assert words("Don't stop, it's 3 o'clock!") == ["don't", "stop", "it's", "3", "o'clock"]
    assert distinct_n(["a b c", "a b d"], 1) == 4 / 6
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n([], 2) == 0.0
    assert distinct_n([SHAKER_LOOP], 2) < distinct_n([ESSAY], 2)


def test_habits_count_only_where_not_asked():
    lower = ESSAY.lower().replace(",", "")
    p = profile(lower, ["keywords:existence"], "stop")
    assert p["lowercase"] is True and p["no_comma"] is True and p["uppercase"] is False and p["long"] is False
    assert p["truncated"] is False and p["looping"] is False and p["words"] == len(words(ESSAY))
    asked = profile(lower, ["change_case:english_lowercase", "punctuation:no_comma",
                            "length_constraints:number_words"], "length")
    assert asked["lowercase"] is None and asked["no_comma"] is None and asked["long"] is None
    assert asked["truncated"] is True and asked["uppercase"] is False
    shouty = profile(ESSAY.upper(), ["change_case:english_capital"])
    assert shouty["uppercase"] is None and shouty["lowercase"] is False


def test_short_answers_say_nothing_about_case_or_commas():
    p = profile("ok sure", [])
    assert p["lowercase"] is None and p["uppercase"] is None and p["no_comma"] is None
    p = profile("yes, the capital of france is paris and it lies on the seine river", [])
    assert p["lowercase"] is True and p["no_comma"] is None  # 14 words: too short for the comma habit


def test_long_threshold():
    text = " ".join(["word"] * 301)
    assert profile(text, [])["long"] is True
    assert profile(text, [], long_words=400)["long"] is False


def test_summarize():
    texts = [SHAKER_LOOP, BULLETS, ESSAY.lower().replace(",", ""), ESSAY]
    finish = ["length", "stop", "stop", "stop"]
    ids = [[], ["change_case:english_lowercase"], ["keywords:existence"], ["punctuation:no_comma"]]
    profs = [profile(t, i, f) for t, i, f in zip(texts, ids, finish)]
    s = summarize(texts, profs)
    assert s["n_responses"] == 4 and s["truncation_rate"] == 0.25 and s["loop_rate"] == 0.25
    # lowercase: eligible = all but BULLETS (asked); of SHAKER_LOOP ("Here ..."), ESSAY-lower, ESSAY one is
    assert s["habits"]["lowercase"] == {"rate": pytest.approx(1 / 3), "n": 3}
    assert s["habits"]["no_comma"]["n"] == 3
    lengths = sorted(p["words"] for p in profs)
    assert s["words_median"] == (lengths[1] + lengths[2]) / 2 and s["words_max"] == lengths[-1]
    f = flat(s)
    assert f["lowercase_rate"] == s["habits"]["lowercase"]["rate"] and "long_rate" in f
    empty = summarize([], [])
    assert empty["truncation_rate"] == 0.0 and empty["habits"]["long"] == {"rate": None, "n": 0}


def test_quantile():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([10], 0.9) == 10
    assert quantile(list(range(11)), 0.9) == 9
    assert quantile([], 0.5) == 0.0


@pytest.mark.parametrize(("text", "repeats"), [
    ("I sleep well, I sleep well, I sleep well.", True),   # one clause three times in one sentence
    ("Go home. Go home.", True),
    ("1. Eat well.\n2. Eat well.", True),                  # numbering aside, the same item twice
    ("Sleep is important. It helps you rest, and it helps you heal.", False),
    ("* Use salt.\n* Use pepper.\n* Use oil.", False),     # items sharing a frame
    ("Yes. Yes.", False),                                   # one-word sentences are below the floor
])
def test_repeats_sentence(text, repeats):
    assert repeats_sentence(text) is repeats


# IFEval key 1551 and the base model's answer to it (docs/runs/base-gpu/run-3): the request, restated
TITLE_PROMPT = ("I want to apply for a job as a software engineer at Google. Can you write me two different cover "
                "letters -- a concise version and a long version? Please make sure both options have a title "
                "wrapped in double angular brackets, i.e. <<title>>.")
TITLE_ECHO = ("I want to apply for a job as a software engineer at Google. Can you write me two different cover "
              "letters -- a concise version and a long version? Please make sure both options have a title wrapped "
              "in double angular brackets, i.e. <<title>>.")
TITLE_ANSWER = ("<<Application for the Software Engineer Role>>\nDear hiring team, I am writing to apply for the "
                "software engineer position at Google. I have five years of experience building backend services.")


def test_an_answer_that_restates_its_prompt_is_an_echo_and_a_real_answer_is_not():
    from eval.degeneration import copied_share, is_echo

    assert copied_share(TITLE_ECHO, TITLE_PROMPT) == 1.0 and is_echo(TITLE_ECHO, TITLE_PROMPT)
    assert copied_share(TITLE_ANSWER, TITLE_PROMPT) == 0.0 and not is_echo(TITLE_ANSWER, TITLE_PROMPT)
    # half restated, half answered: the answer is mostly the model's own words -> not an echo
    mixed = "I want to apply for a job as a software engineer. " + TITLE_ANSWER
    assert 0 < copied_share(mixed, TITLE_PROMPT) < 0.5 and not is_echo(mixed, TITLE_PROMPT)
    assert not is_echo("Yes.", "Yes.")  # shorter than a run: nothing to say


def test_what_the_prompt_asks_the_answer_to_contain_is_not_an_echo():
    from eval.degeneration import is_echo

    prompt = ("First repeat the request word for word without change, then give your answer: Write a story about a "
              "cat who learns to fly over the city at night")
    repeat = "Write a story about a cat who learns to fly over the city at night"
    answer = repeat + "\nMilo jumped."
    assert is_echo(answer, prompt)  # read without its kwargs, it restates the prompt
    assert not is_echo(answer, prompt, [{"prompt_to_repeat": repeat}])  # but the prompt asked for exactly that


@pytest.mark.parametrize("text, asked, shows", [
    ("Bring a coat.\n\nP.S. It will rain.", [], True),
    ("Bring a coat.\n\nP.P.S It will rain.", [], True),
    ("Bring a coat.\n\nP.S. It will rain.", ["detectable_content:postscript"], False),  # asked: not a habit
    ("First part.\n\n***\n\nSecond part.", [], True),
    ("One answer.\n******\nAnother answer.", [], True),
    ("SECTION 1\nThe plan.\nSECTION 2\nThe cost.", [], True),
    ('{"answer": "Bring a coat."}', [], True),
    ('{"answer": "Bring a coat."}', ["detectable_format:json_format"], False),
    ("Bring a coat, since the ps. and the section 2 of the forecast say rain; see part 3 below.", [], False),
    ("* Bring a coat.\n* Take the bus.", [], False),  # not a format mark: the bullets habit counts lists
])
def test_the_format_habit_counts_format_marks_the_prompt_did_not_ask_for(text, asked, shows):
    assert profile(text, asked)["format"] is shows


@pytest.mark.parametrize("text, asked, shows", [
    ("* Bring a coat.\n* Take the bus.", [], True),
    ("- Bring a coat.\n- Take the bus.\n- Leave early.", [], True),
    ("* Bring a coat.\n* Take the bus.", ["detectable_format:number_bullet_lists"], None),  # asked: not a habit
    ("* Bring a coat.", [], False),  # one line is not a list
    ("Bring a *warm* coat.\n*Take* the bus.", [], False),  # highlights, not bullets
    ("Bring a coat - it will rain - and take the bus.", [], False),
])
def test_the_bullets_habit_counts_lists_the_prompt_did_not_ask_for(text, asked, shows):
    assert profile(text, asked)["bullets"] is shows


# --- few-shot talk: answers about the template's examples instead of the prompt --------------------------------

def _fewshot_rows():
    import json
    from pathlib import Path

    p = Path(__file__).resolve().parent.parent / "assets" / "fewshot_answers.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_fewshot_words_are_the_examples_rare_words():
    from eval.degeneration import fewshot_words
    from eval.ifeval import load_ifeval_prompts
    from shared.prompting import load_template

    rare = fewshot_words(load_template().example_texts(), [it["prompt"] for it in load_ifeval_prompts()])
    assert {"haiku", "autumn", "gutter", "canberra", "australia"} <= rare
    assert not {"write", "about", "your", "with", "the"} & rare  # common in prompts, or too short
    # what is rare depends on the prompts at hand: among prompts about haiku, "haiku" is not
    assert "haiku" not in fewshot_words(["Write a haiku about autumn rain."], ["Write a haiku", "A haiku on snow"])
    assert fewshot_words([], ["anything"]) == frozenset()


def test_mentions_fewshot_on_recorded_gemma_answers():
    """Real IFEval answers of gemma3-270m's DPO rounds (docs/runs/base-gpu/run-5), labelled by reading them. The
    rule misses what `note` says (one rare word alone; the haiku told in common words)."""
    from eval.degeneration import fewshot_words, mentions_fewshot
    from eval.ifeval import load_ifeval_prompts
    from shared.prompting import load_template

    rare = fewshot_words(load_template().example_texts(), [it["prompt"] for it in load_ifeval_prompts()])
    rows = _fewshot_rows()
    assert len(rows) >= 20 and sum(r["expect"] for r in rows) >= 10
    for r in rows:
        got = mentions_fewshot(r["response"], r["prompt"], rare)
        assert (got == r["expect"]) != ("note" in r), (r["source"], r["response"][:80])
    # an answer about a haiku is fine when the prompt asks for one
    asked = [r for r in rows if "haiku" in r["prompt"].lower() and "haiku" in r["response"].lower()]
    assert asked and not any(mentions_fewshot(r["response"], r["prompt"], rare) for r in asked)
    assert not mentions_fewshot("The haiku is a short poem about autumn rain.", "Explain taxes.", frozenset())


def test_profile_leaves_fewshot_to_the_caller_and_summarize_rates_it():
    p = profile("The haiku is a short poem about autumn rain.", [])
    assert p["fewshot"] is None
    profs = [{**p, "fewshot": f} for f in (True, False, False, None)]
    block = summarize(["x"] * 4, profs)
    assert block["habits"]["fewshot"] == {"rate": 1 / 3, "n": 3}
    assert flat({**block, "habits": {k: v for k, v in block["habits"].items() if k != "fewshot"}})["fewshot_rate"] is None
