"""Extra pairs that teach what the checker pairs cannot: when to stop, and habits only on request.

Measured on a base model's first GPU round (docs/training.md): the checker pairs alone taught habits. 44 of
293 pairs asked for all-lowercase and rewarded it, 100 asked for no commas and rewarded that; no pair showed
the model an answer that does NOT do either when it was not asked. After one round, 16% of answers to prompts
that never ask for lowercase were all-lowercase (2% before). And 39% of the base model's answers loop until
the token limit, but looping candidates were only ever ruled out, so no pair taught the model to stop.

Three kinds of extra pair come from each item, beside its checker pair:

* **stop** - a finished, relevant candidate against a looping one of the same item, cut just past the first
  repeat of its loop (:func:`stop_pair`, :func:`eval.degeneration.loop_onset`), when the finished one passes
  every constraint the cut one passes. The base model's own samples: "do not start repeating" is the lesson.
  Whole loops (300 tokens against 25) taught "be short" instead: on the first GPU round with stop pairs,
  loops fell from 39% to 1% but the median answer from 26 words to 11, and IFEval with it. Cut, the rejected
  answer is about as long as the chosen one (median 32 words against 25 on that round's pairs). A candidate
  truncated without a loop makes no stop pair: against it, only "shorter" could be learned.
* **habit contrast** - ``contrast:<habit>`` for each of lowercase / uppercase / no_comma that the
  instruction does not ask for: the item's chosen answer (which does not show the habit) against the same
  text with the habit applied (:data:`TRANSFORMS`), when that transform passes no constraint the answer fails.
  Set against a pair that rewards lowercase where lowercase was asked for, it says "only when asked".
* **format repair** - ``repair``: the item's best finished answer with the format instructions it missed
  applied by rule (:mod:`pair_builder.repair`), against the answer as written, when the checkers pass the
  repaired text on every constraint the answer passed and more. The base model's samples never show a
  requested format, so no checker pair can teach one (:func:`repair_pair`).

Items store these as candidates (:func:`item_extras`, with their reference log-probs) in their ``done``
entry; at the end of a build :func:`select_extras` takes, over the whole round,

* ``stop_pairs`` stop pairs and ``repair_pairs`` repair pairs per checker pair;
* per habit, ``habit_contrast`` contrast pairs for every pair (checker or stop) that pushes the habit up
  (chosen shows it, rejected does not: :func:`rewarded_habits`) beyond the pairs that push it down, where a pair
  whose instruction did not ask for the habit counts ``incidental_weight`` (:func:`habit_push`). A contrast
  is a minimal pair (only the habit differs), and it pushes much harder than a checker pair: on gemma3-270m,
  one contrast per lowercase checker pair turned lowercase down everywhere, where asked too, and half as many
  still did; no mix taught "only when asked" at that scale (``bench/contrast_probe.py``). So the default,
  0.25, aims at a net push near zero: the habit is not taught everywhere;

each in a fixed order from the item id (the same pairs on every rerun), and :func:`write_extras` writes them
atomically as ``extras.parquet`` beside the shards. It is derived data: rebuilt whole after every build. An
extra pair's ``principle_id`` names the rule that made it (``stop``, ``repair``, ``contrast:lowercase``, ...).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from eval.degeneration import (
    LOWERCASE_ID,
    NO_COMMA_ID,
    UPPERCASE_ID,
    is_looping,
    loop_onset,
    profile,
    repeats_sentence,
    words,
)
from pair_builder.repair import best_repair
from pair_builder.sample import Candidate
from pair_builder.verify import Relevance, dominates, unrequested_habit
from shared.atomic import atomic_write_bytes
from shared.records import CONTRAST_PREFIX, REPAIR_KIND, STOP_KIND, content_hash

EXTRAS_FILE = "extras.parquet"
STOP = STOP_KIND
REPAIR = REPAIR_KIND
STOP_MIN_WORDS = 5  # a finished answer shorter than this teaches "say nothing", not "stop"


def _drop_commas(text: str) -> str:
    return re.sub(r",(?=\s)", "", text).replace(",", " ")


# habit -> (the constraint that asks for it, the transform that applies it)
TRANSFORMS: dict[str, tuple[str, Callable[[str], str]]] = {
    "lowercase": (LOWERCASE_ID, str.lower),
    "uppercase": (UPPERCASE_ID, str.upper),
    "no_comma": (NO_COMMA_ID, _drop_commas),
}


def cut_loop(c: Candidate, check: Callable[[str], list[bool]] | None = None) -> tuple[str, list[bool]] | None:
    """A looping candidate's text (ruled out as looping, or as truncated by a loop that ran to the token limit)
    cut just past the first repeat of its loop, and the constraints it passes (``check``, or the whole text's
    when None); None when the candidate does not loop or no loop is found."""
    loops = c.problem == "looping" or (c.problem == "truncated" and is_looping(c.text))
    if not loops or (end := loop_onset(c.text)) is None:
        return None
    text = c.text[:end].rstrip()
    return (text, check(text) if check is not None else list(c.passed)) if text else None


def stop_pair(cands: list[Candidate], *, relevance: Relevance = Relevance(), constraint_ids: Sequence[str] = (),
              check: Callable[[str], list[bool]] | None = None) -> tuple[int, int, str, list[bool]] | None:
    """(finished index, looping index, the looping text cut by :func:`cut_loop`, its passes) or None.

    Finished: no problem, relevant, at least :data:`STOP_MIN_WORDS` words, no sentence or clause said twice
    (:func:`eval.degeneration.repeats_sentence`: a loop too short to be caught), no unrequested case habit the
    cut loop lacks; it passes every constraint the cut loop passes. Among those, the one passing most
    constraints (then a rewrite, then the earlier); against it the cut loop passing fewest.
    """
    bad = {i: cut for i, c in enumerate(cands) if (cut := cut_loop(c, check)) is not None}
    good = usable_answers(cands, relevance)
    options = [(g, b) for g in good for b, (text, passed) in bad.items()
               if dominates(cands[g].passed, passed, strict=False) and cands[g].text.strip() != text.strip()
               and not unrequested_habit(cands[g].text, text, constraint_ids)]
    if not options:
        return None
    g, b = max(options, key=lambda gb: (cands[gb[0]].n_passed, cands[gb[0]].route == "rewrite", -gb[0],
                                        -sum(bad[gb[1]][1]), -gb[1]))
    return g, b, *bad[b]


def usable_answers(cands: list[Candidate], relevance: Relevance = Relevance()) -> list[int]:
    """Indices of the finished answers an extra pair may build on: no problem, relevant, at least
    :data:`STOP_MIN_WORDS` words, no sentence said twice; most constraints passed first, then the earlier."""
    good = [i for i, c in enumerate(cands) if c.problem is None and relevance.ok(c)
            and len(words(c.text)) >= STOP_MIN_WORDS and not repeats_sentence(c.text)]
    return sorted(good, key=lambda i: (-cands[i].n_passed, i))


def repair_pair(cands: list[Candidate], constraints: Sequence[Any], *, check: Callable[[str], list[bool]],
                relevance: Relevance = Relevance(), exclude: Sequence[str] = ()) -> tuple[int, str, list[bool]] | None:
    """(answer index, its repaired text, the repaired text's verdicts) for the first usable answer
    (:func:`usable_answers`) that :func:`pair_builder.repair.best_repair` can make pass more constraints; the
    other usable answers may serve as a second response. None when no answer can be repaired."""
    usable = usable_answers(cands, relevance)
    for g in usable:
        others = [cands[i].text for i in usable if i != g and cands[i].text.strip() != cands[g].text.strip()]
        if (got := best_repair(cands[g].text, cands[g].passed, constraints, check, others=others,
                               exclude=exclude)) is not None:
            return g, *got
    return None


def contrasts(text: str, constraint_ids: Sequence[str]) -> dict[str, str]:
    """habit -> ``text`` with the habit applied, for each habit the instruction does not ask for and ``text``
    does not already show (:func:`eval.degeneration.profile` says False, not None: long enough to tell)."""
    prof = profile(text, constraint_ids)
    out = {}
    for habit, (_, apply) in TRANSFORMS.items():
        if prof[habit] is False:
            changed = apply(text)
            if changed.strip() != text.strip():
                out[habit] = changed
    return out


def rewarded_habits(chosen: str, rejected: str) -> list[str]:
    """The habits of :data:`TRANSFORMS` that ``chosen`` shows and ``rejected`` does not: what the pair rewards
    besides its constraints."""
    c, r = profile(chosen, ()), profile(rejected, ())
    return [h for h in TRANSFORMS if c[h] and not r[h]]


def item_extras(cands: list[Candidate], *, kept: tuple[int, int] | None, constraint_ids: Sequence[str],
                check: Callable[[str], list[bool]], relevance: Relevance = Relevance(), stop: bool = True,
                contrast: bool = True, repair: bool = False, constraints: Sequence[Any] = (),
                no_repair: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The extra-pair candidates of one item: ``{"kind", "chosen", "rejected", "chosen_passed",
    "rejected_passed"}`` dicts (texts and constraint counts). ``kept`` is the item's checker pair (chosen,
    rejected indices) or None; ``check`` scores a text against the item's constraints. ``repair`` needs the
    ``constraints`` themselves (ids and kwargs); ``no_repair``: instruction ids never repaired."""
    out: list[dict[str, Any]] = []
    if repair and (rp := repair_pair(cands, constraints, check=check, relevance=relevance, exclude=no_repair)):
        g, text, passed = rp
        out.append({"kind": REPAIR, "chosen": text, "rejected": cands[g].text, "chosen_passed": sum(passed),
                    "rejected_passed": cands[g].n_passed})
    if stop and (sp := stop_pair(cands, relevance=relevance, constraint_ids=constraint_ids, check=check)):
        g, _, text, passed = sp
        out.append({"kind": STOP, "chosen": cands[g].text, "rejected": text, "chosen_passed": cands[g].n_passed,
                    "rejected_passed": sum(passed)})
    if contrast and kept is not None:
        chosen = cands[kept[0]]
        for habit, changed in contrasts(chosen.text, constraint_ids).items():
            passed = check(changed)
            if dominates(chosen.passed, passed, strict=False):
                out.append({"kind": f"{CONTRAST_PREFIX}{habit}", "chosen": chosen.text, "rejected": changed,
                            "chosen_passed": chosen.n_passed, "rejected_passed": sum(passed)})
    return out


def extra_id(item_id: str, kind: str) -> str:
    return content_hash(item_id, kind)


def select_extras(entries: list[dict[str, Any]], records: dict[str, dict[str, Any]], *, habit_contrast: float,
                  stop_pairs: float, seed: int = 0, incidental_weight: float = 1.0,
                  repair_pairs: float = 0.0) -> list[dict[str, Any]]:
    """The round's extra pairs (full pair records), chosen from the items' candidates (``entries``: the done
    log; ``records``: the checker pairs by id). See the module doc for how many of each; a habit difference the
    instruction did not ask for counts ``incidental_weight`` (:func:`habit_push`)."""
    pool: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for e in entries:
        for x in e.get("extras") or ():
            if x["kind"] in (STOP, REPAIR) or e["id"] in records:  # a contrast needs its item's checker pair kept
                pool.setdefault(x["kind"], []).append((e["id"], x))

    def take(kind: str, n: int) -> list[dict[str, Any]]:
        ranked = sorted(pool.get(kind, ()), key=lambda ix: content_hash(seed, ix[0], kind))
        return [{**x["record"], "id": extra_id(iid, kind)} for iid, x in ranked[:max(n, 0)]]

    out = take(STOP, round(stop_pairs * len(records))) + take(REPAIR, round(repair_pairs * len(records)))
    # what the checker pairs and the stop pairs push up and down: contrasts fill the gap
    push = habit_push([*records.values(), *out], incidental_weight)
    for h in TRANSFORMS:
        out += take(f"{CONTRAST_PREFIX}{h}", round(habit_contrast * push[h]))
    return out


def habit_push(rows: Sequence[dict[str, Any]], incidental_weight: float = 1.0) -> dict[str, float]:
    """Per habit, the pairs that push it up less those that push it down (:func:`habit_balance`). A pair whose
    instruction asked for the habit counts 1: the habit is the difference its constraint verdict rests on. One
    that did not ask counts ``incidental_weight``: there the habit is one difference among many between two
    different answers. Measured on gemma3-270m's second GPU round: 26 asked pairs rewarded lowercase and 23
    incidental ones penalised it; trained, the model wrote 15% of unasked answers in lowercase (0.4% before):
    the incidental pairs did not offset the asked ones (docs/training.md)."""
    b = habit_balance(rows)
    return {h: (v["asked_up"] - v["asked_down"]) + incidental_weight * (v["unasked_up"] - v["unasked_down"])
            for h, v in b.items()}


def habit_balance(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per habit, how many pairs push it up (chosen shows it, rejected does not) and down (the reverse), where
    the instruction asked for it and where it did not. A set that teaches the habit only on request has
    ``up`` ~ ``down`` among the pairs that did not ask (its contrast pairs push down)."""
    out = {h: {"asked_up": 0, "asked_down": 0, "unasked_up": 0, "unasked_down": 0} for h in TRANSFORMS}
    for r in rows:
        ids = {c["id"] for c in json.loads(r.get("constraints") or "[]")}
        c, j = profile(r["chosen"], ()), profile(r["rejected"], ())
        for h, (cid, _) in TRANSFORMS.items():
            where = "asked" if cid in ids else "unasked"
            if c[h] and not j[h]:
                out[h][f"{where}_up"] += 1
            elif j[h] and not c[h]:
                out[h][f"{where}_down"] += 1
    return out


def balance_table(balance: dict[str, dict[str, int]]) -> str:
    rows = "".join(f"| {h} | {b['asked_up']} | {b['asked_down']} | {b['unasked_up']} | {b['unasked_down']} |\n"
                   for h, b in balance.items())
    return ("| habit | asked: up | asked: down | not asked: up | not asked: down |\n|---|---|---|---|---|\n"
            + rows)


def extras_summary(entries: list[dict[str, Any]], records: dict[str, dict[str, Any]], written: list[dict[str, Any]],
                   *, habit_contrast: float, stop_pairs: float, incidental_weight: float = 1.0,
                   repair_pairs: float = 0.0) -> dict[str, Any]:
    """For the dataset card: the settings, what the checker pairs reward, the candidates, what was written."""
    return {
        "habit_contrast": habit_contrast, "stop_pairs": stop_pairs, "incidental_habit_weight": incidental_weight,
        "repair_pairs": repair_pairs,
        "rewarded_habits": dict(Counter(h for r in records.values()
                                        for h in rewarded_habits(r["chosen"], r["rejected"])).most_common()),
        "candidates": dict(Counter(x["kind"] for e in entries for x in e.get("extras") or ()).most_common()),
        "written": dict(Counter(r["principle_id"] for r in written).most_common()),
        "balance": habit_balance([*records.values(), *written]),
    }


def extras_counts(pairs_dir: str | Path) -> dict[str, int]:
    """Extra pairs in a pairs dir, by kind (``{}`` when there are none)."""
    path = Path(pairs_dir) / EXTRAS_FILE
    if not path.exists():
        return {}
    kinds = pq.read_table(path, columns=["principle_id"]).column("principle_id").to_pylist()
    return dict(Counter(kinds).most_common())


def write_extras(pairs_dir: str | Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path | None:
    """``extras.parquet`` with ``rows`` (atomically replaced; the shards' schema, so the trainer reads them as
    one dataset), or removed when there are none."""
    path = Path(pairs_dir) / EXTRAS_FILE
    if not rows:
        path.unlink(missing_ok=True)
        return None
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    if not (path.exists() and path.read_bytes() == buf.getvalue()):  # a resubmission that changed nothing
        atomic_write_bytes(path, buf.getvalue())
    return path
