"""What a model gives up while its IFEval score rises: loops, truncation, sameness, and unrequested habits.

A score can climb through degenerate output (everything lowercase, no commas, long looping answers all
satisfy some verifiable instructions by accident). These measures sit beside the four IFEval metrics in
every eval, and pair building uses :func:`is_looping` to rule out looping candidates.

Pure functions, no I/O:

* :func:`profile` - one response: word count, truncated, looping, and each unrequested habit (``None``
  where the prompt asked for it, or the answer is too short to tell);
* :func:`summarize` - a set of profiled responses: truncation and loop rates, distinct-1/2, length
  distribution, habit rates (each over the prompts that did not ask for it).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)

LOWERCASE_ID = "change_case:english_lowercase"
UPPERCASE_ID = "change_case:english_capital"
NO_COMMA_ID = "punctuation:no_comma"
BULLETS_ID = "detectable_format:number_bullet_lists"
LENGTH_PREFIX = "length_constraints:"
MIN_CASED_LETTERS = 10   # an answer needs this many cased letters before "all lowercase" says anything
COMMA_MIN_WORDS = 20     # comma-free counts only for answers longer than this (short ones need no comma)
DEFAULT_LONG_WORDS = 300
TAIL_LINES = 4           # an answer ending in this many copies of one line loops

# habit -> what it means; the key is also the field of a profile and of summarize()["habits"]
HABITS: dict[str, str] = {
    "lowercase": f"all-lowercase answers (>= {MIN_CASED_LETTERS} cased letters), prompts without {LOWERCASE_ID}",
    "uppercase": f"all-uppercase answers (>= {MIN_CASED_LETTERS} cased letters), prompts without {UPPERCASE_ID}",
    "no_comma": f"comma-free answers of > {COMMA_MIN_WORDS} words, prompts without {NO_COMMA_ID}",
    "long": f"answers past the length limit (words), prompts without any {LENGTH_PREFIX}*",
    "format": "answers with a format mark the prompt did not ask for: a P.S. line, a *** or ****** divider, "
              "SECTION/PART n headers, or the whole answer as JSON (format repairs must not teach them everywhere)",
    "bullets": f"answers with a markdown bullet list (2+ lines starting '* ' or '- '), prompts without {BULLETS_ID}",
    "fewshot": "answers that talk about the prompt template's few-shot examples instead of the prompt: at least "
               "2 of the examples' rare words that the prompt does not contain ('The haiku is a short poem about "
               "autumn rain.' for a question on taxes)",
}


def _whole_json(text: str) -> bool:
    t = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not t.startswith(("{", "[")):
        return False
    try:
        json.loads(t)
    except ValueError:
        return False
    return True


# instruction id -> does an answer show that format (eval.degeneration.profile's "format" habit)
FORMAT_MARKS: dict[str, Any] = {
    "detectable_content:postscript": re.compile(r"^\s*p\.\s?(p\.\s?)?s\b", re.IGNORECASE | re.MULTILINE).search,
    "length_constraints:number_paragraphs": re.compile(r"^\s*\*\*\*\s*$", re.MULTILINE).search,
    "combination:two_responses": re.compile(r"\*{6}").search,
    "detectable_format:multiple_sections": re.compile(r"^\s*(section|part)\s+\d+\b", re.IGNORECASE | re.MULTILINE).search,
    "detectable_format:json_format": _whole_json,
}


_BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)  # IFEval's own bullet checker counts these lines


def has_bullets(text: str) -> bool:
    """Whether ``text`` holds a bullet list: two or more lines starting "* " or "- " (not *highlights*)."""
    return len(_BULLET.findall(text)) >= 2


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _loop_tokens(text: str) -> list[str]:
    """Words with every number made one token: "1. a shaker 2. a shaker" repeats like "a shaker a shaker"."""
    return ["#" if t.isdigit() else t for t in words(text)]


def repeated_ngram_share(tokens: list[str], n: int) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier n-gram (0 = all distinct)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _tail_period(tokens: list[str], max_period: int = 120) -> tuple[int, int]:
    """(period, repeats) of the longest exactly periodic tail of ``tokens``: the text ends in a loop."""
    best = (0, 0)
    n = len(tokens)
    for p in range(1, min(max_period, n // 2) + 1):
        i = n - p - 1
        while i >= 0 and tokens[i] == tokens[i + p]:
            i -= 1
        covered = n - 1 - i  # tokens from the end that repeat with period p
        repeats = covered // p
        if repeats >= 2 and covered > best[0] * best[1]:
            best = (p, repeats)
    return best


def is_looping(text: str, *, min_words: int = 12) -> bool:
    """True when ``text`` is caught in a repetition loop.

    Any of: its last :data:`TAIL_LINES` non-empty lines are one line repeated, whatever the line holds
    ("-" or "*******" over and over); its end repeats one unit at least three times and the loop covers a third of the words
    (``* ice cube in the shape of a shaker`` over and over, numbered or not; "is is is is"); lines of four
    or more words that repeat earlier lines are more than half of such lines (one of them three or more
    times); over half of its 4-grams repeat earlier ones. Numbers count as one token, so a numbered loop
    is still a loop. A bulleted list whose items share a frame ("* Use ..."), or a poem or song whose
    refrain or chorus comes back every stanza, does not trip these.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= TAIL_LINES and len(set(lines[-TAIL_LINES:])) == 1:
        return True  # the same line, whatever it holds ("-", "*******", a sentence), over and over at the end
    toks = _loop_tokens(text)
    if len(toks) < min_words:
        return False
    period, repeats = _tail_period(toks)
    if repeats >= 3 and period * repeats >= max(len(toks) / 3, 6):
        return True
    lines = [" ".join(t) for t in (_loop_tokens(ln) for ln in text.splitlines()) if len(t) >= 4]
    if lines:
        top = Counter(lines).most_common(1)[0][1]
        if top >= 3 and (len(lines) - len(set(lines))) / len(lines) > 0.5:
            return True
    return repeated_ngram_share(toks, 4) > 0.5


_SENTENCE = re.compile(r"[^.!?\n]+")


def repeats_sentence(text: str, *, min_words: int = 2) -> bool:
    """True when a sentence or line, or a clause within one, of at least ``min_words`` words comes back in
    ``text`` (case, numbers and punctuation aside). "I sleep well, I sleep well, I sleep well." is too short
    for :func:`is_looping`'s floor but is no answer to learn from. List items that share a frame pass."""
    seen: set[tuple[str, ...]] = set()
    for part in _SENTENCE.findall(text):
        clauses = [c for c in (tuple(_loop_tokens(x)) for x in part.split(",")) if len(c) >= min_words]
        if len(clauses) != len(set(clauses)):
            return True
        toks = tuple(_loop_tokens(part))
        if len(toks) >= min_words:
            if toks in seen:
                return True
            seen.add(toks)
    return False


_TOKEN_SPAN = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


def loop_onset(text: str) -> int | None:
    """Where the loop of a looping ``text`` has shown itself once: the character offset just past the first
    repeat of its repeating unit (a tail that repeats a unit of words, numbers aside; else the first sentence
    or line said again). ``text[:loop_onset(text)]`` is the answer as far as its first repetition, so a stop
    pair can reject "starting to repeat" instead of "going on for 300 tokens", which DPO learns as "be short".
    None when no repeated unit is found."""
    spans = [(m.start(), m.end(), "#" if m.group().isdigit() else m.group().lower())
             for m in _TOKEN_SPAN.finditer(text)]
    toks = [t for _, _, t in spans]
    period, repeats = _tail_period(toks)
    end: int | None = None
    if repeats >= 3:
        start = len(toks) - period * repeats
        while start > 0 and toks[start - 1] == toks[start - 1 + period]:
            start -= 1
        end = spans[start + 2 * period - 1][1]
    else:
        seen: set[tuple[str, ...]] = set()
        for m in _SENTENCE.finditer(text):
            unit = tuple(_loop_tokens(m.group()))
            if len(unit) >= 2 and unit in seen:
                end = m.end()
                break
            seen.add(unit)
    if end is None:
        return None
    while end < len(text) and text[end] in ".!?,;:*)\"'":
        end += 1
    return end


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n over a set of responses: unique n-grams / all n-grams (higher = more varied)."""
    total, seen = 0, set()
    for t in texts:
        toks = words(t)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


ECHO_SPAN = 6     # words in a run copied from the prompt
ECHO_SHARE = 0.5  # an answer at least this much made of such runs restates its prompt instead of answering


def strings_in(value: Any) -> list[str]:
    """Every string in ``value``, any nesting of lists, tuples and dicts (an instruction's kwargs)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in strings_in(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in strings_in(v)]
    return []


def ngrams(toks: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The runs of ``n`` consecutive tokens."""
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def copied_share(text: str, prompt: str, keep: Any = (), span: int = ECHO_SPAN) -> float:
    """Share of ``text``'s words inside runs of ``span`` words that also occur in ``prompt``, leaving out runs
    of the strings the prompt asks the answer to contain (``keep``: an instruction's kwargs, e.g. an end phrase,
    keywords, a prompt to repeat; any nesting of strings, lists and dicts)."""
    t = words(text)
    if len(t) < span:
        return 0.0
    runs = ngrams(words(prompt), span)
    for s in strings_in(keep):
        runs -= ngrams(words(s), span)
    covered = [False] * len(t)
    for i in range(len(t) - span + 1):
        if tuple(t[i:i + span]) in runs:
            covered[i:i + span] = [True] * span
    return sum(covered) / len(t)


# The few-shot habit (:func:`mentions_fewshot`): a word of the template's examples is "rare" when fewer than this
# share of the prompts at hand contain it and it is not a common English word (IFEval's word list), and an answer
# talks about the examples when it has this many rare words its prompt lacks. On the fifth GPU run's evals
# (docs/runs/base-gpu/run-5) the rates by round were 0.9%, 4.3%, 20.7%, 47.3%. Without the common-word list,
# pairs of everyday words ("many people", "work ... long") made half of the 7.3% of round-0 candidates it flagged;
# with it, 1.8% are flagged, nearly all about the haiku, Canberra or the study-tips example.
FEWSHOT_MAX_DF = 0.05
FEWSHOT_MIN_WORDS = 2
FEWSHOT_MIN_LETTERS = 4


def fewshot_words(examples: Sequence[str], prompts: Sequence[str], max_df: float = FEWSHOT_MAX_DF,
                  common: frozenset[str] | set[str] | None = None) -> frozenset[str]:
    """The rare words of few-shot ``examples`` (their queries and answers): words of at least
    :data:`FEWSHOT_MIN_LETTERS` letters, not in ``common``, that fewer than ``max_df`` of ``prompts`` contain
    ("haiku", "autumn", "canberra" for the base template; not "write", "people" or "night"). ``prompts``: the
    prompts being answered (an eval suite, a round's instructions), so the words are rare where they are judged;
    ``common``: everyday words, which prompts rarely hold but answers often do (default
    :data:`eval.ifeval.COMMON_WORDS`)."""
    if common is None:
        from eval.ifeval import COMMON_WORDS as common
    cand = {w for t in examples for w in words(t) if len(w) >= FEWSHOT_MIN_LETTERS and w.isalpha()} - set(common)
    if not cand:
        return frozenset()
    df = Counter(w for p in prompts for w in cand & set(words(p)))
    return frozenset(w for w in cand if df[w] < max_df * max(len(prompts), 1))


def mentions_fewshot(text: str, prompt: str, rare: frozenset[str] | set[str]) -> bool:
    """Whether ``text`` talks about the few-shot examples: it has at least :data:`FEWSHOT_MIN_WORDS` distinct
    ``rare`` words (:func:`fewshot_words`) that ``prompt`` does not contain. DPO rounds on gemma3-270m grew this
    from 1% of IFEval answers to half of them in three rounds while the clean score still rose."""
    if not rare:
        return False
    return len((set(words(text)) & rare) - set(words(prompt))) >= FEWSHOT_MIN_WORDS


def is_echo(text: str, prompt: str, keep: Any = ()) -> bool:
    """Whether ``text`` restates its prompt: at least :data:`ECHO_SHARE` of its words are copied from it in runs
    of :data:`ECHO_SPAN` (:func:`copied_share`). A base model answers a quarter of IFEval's prompts this way
    ("I want to apply for a job ... with a title wrapped in double angular brackets, i.e. <<title>>."), and such
    an answer passes format checkers by copying the request: on gemma3-270m half of its finished prompt-level
    passes did (docs/runs/base-gpu/run-3)."""
    return copied_share(text, prompt, keep) >= ECHO_SHARE


def _cased_letters(text: str) -> list[str]:
    return [ch for ch in text if ch.lower() != ch.upper()]


def profile(text: str, instruction_ids: Sequence[str], finish_reason: str | None = None, *,
            long_words: int = DEFAULT_LONG_WORDS) -> dict[str, Any]:
    """One response: ``words``, ``truncated`` (finish_reason == "length"), ``looping``, and each habit of
    :data:`HABITS` as True/False, or None when the prompt asked for it (its ``instruction_ids``) or the
    answer is too short to show it."""
    ids = set(instruction_ids)
    n = len(words(text))
    cased = _cased_letters(text)
    enough_letters = len(cased) >= MIN_CASED_LETTERS
    return {
        "words": n,
        "truncated": finish_reason == "length",
        "looping": is_looping(text),
        "lowercase": all(c.islower() for c in cased) if enough_letters and LOWERCASE_ID not in ids else None,
        "uppercase": all(c.isupper() for c in cased) if enough_letters and UPPERCASE_ID not in ids else None,
        "no_comma": "," not in text if n > COMMA_MIN_WORDS and NO_COMMA_ID not in ids else None,
        "long": n > long_words if not any(i.startswith(LENGTH_PREFIX) for i in ids) else None,
        "format": any(bool(mark(text)) for fid, mark in FORMAT_MARKS.items() if fid not in ids) if n else None,
        "bullets": has_bullets(text) if n and BULLETS_ID not in ids else None,
        "fewshot": None,  # needs the prompt and the template: the caller sets it (mentions_fewshot)
    }


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default); 0.0 for none."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def rate(flags: Sequence[bool | None]) -> tuple[float | None, int]:
    """(share of True, how many were not None); the share is None when none count."""
    counted = [f for f in flags if f is not None]
    return (sum(counted) / len(counted) if counted else None), len(counted)


def summarize(texts: Sequence[str], profiles: Sequence[dict[str, Any]], *,
              long_words: int = DEFAULT_LONG_WORDS) -> dict[str, Any]:
    """The ``degeneration`` block of an eval, from its responses and their :func:`profile`s.

    Rates are shares of responses; each habit's ``rate`` is over its ``n`` eligible responses (None when
    there are none). ``words_*`` describe response length in words."""
    lengths = sorted(p["words"] for p in profiles)
    n = len(profiles)
    habits = {}
    for h in HABITS:
        r, m = rate([p[h] for p in profiles])
        habits[h] = {"rate": r, "n": m}
    return {
        "n_responses": n,
        "truncation_rate": sum(p["truncated"] for p in profiles) / n if n else 0.0,
        "loop_rate": sum(p["looping"] for p in profiles) / n if n else 0.0,
        "echo_rate": rate([p.get("echo") for p in profiles])[0],  # None for rows scored before it was recorded
        "distinct_1": distinct_n(list(texts), 1),
        "distinct_2": distinct_n(list(texts), 2),
        "words_median": quantile(lengths, 0.5),
        "words_p90": quantile(lengths, 0.9),
        "words_mean": sum(lengths) / n if n else 0.0,
        "words_max": lengths[-1] if lengths else 0,
        "long_words": long_words,
        "habits": habits,
    }


def flat(block: dict[str, Any]) -> dict[str, float | None]:
    """A degeneration block as one level of named numbers (habits as ``<habit>_rate``), for tables and guards."""
    out = {k: block[k] for k in ("truncation_rate", "loop_rate", "distinct_1", "distinct_2", "words_median",
                                 "words_p90", "words_mean")}
    out["echo_rate"] = block.get("echo_rate")
    out.update({f"{h}_rate": v["rate"] for h, v in block["habits"].items()})
    out.update({f"{h}_rate": None for h in HABITS if h not in block["habits"]})  # evals from before a habit
    return out
