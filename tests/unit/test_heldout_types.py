"""Held-out instruction types: pair building never draws them, the own eval suite still does, bad lists fail."""

import random

import pytest

from eval.constraints import GENERATED_IDS, check_heldout_types, make_item, own_suite, sample_constraints
from pair_builder.sources import constrain_tasks, seed_instructions
from shared.config import DEFAULT_HELDOUT_TYPES, ConfigError, load_config


def test_default_heldout_types_are_drawable_and_diverse():
    assert len(DEFAULT_HELDOUT_TYPES) >= 5 and set(DEFAULT_HELDOUT_TYPES) <= set(GENERATED_IDS)
    assert len({i.split(":")[0] for i in DEFAULT_HELDOUT_TYPES}) == len(DEFAULT_HELDOUT_TYPES)  # one per category
    assert check_heldout_types(DEFAULT_HELDOUT_TYPES) == []
    assert load_config(None).eval.heldout_types == DEFAULT_HELDOUT_TYPES


def test_sampling_never_draws_excluded_types():
    rng = random.Random(0)
    ex = set(DEFAULT_HELDOUT_TYPES)
    drawn = {c.id for _ in range(400) for c in sample_constraints(rng, 3, ex)}
    assert not drawn & ex and drawn == set(GENERATED_IDS) - ex


def test_pair_sources_exclude_heldout_types_by_default_and_as_given():
    ex = set(DEFAULT_HELDOUT_TYPES)
    seed = seed_instructions(seed=0, variants=2, max_constraints=3)
    assert not {c.id for i in seed for c in i.constraints} & ex
    mine = ["punctuation:no_comma", "keywords:existence"]
    seed2 = seed_instructions(seed=0, variants=2, max_constraints=3, exclude=mine)
    ids2 = {c.id for i in seed2 for c in i.constraints}
    assert not ids2 & set(mine) and ids2 & ex  # the given list replaces the default one
    new = constrain_tasks([f"Describe place number {i} in a few words." for i in range(60)], seed=0,
                          max_constraints=3, source="self_instruct")
    assert not {c.id for i in new for c in i.constraints} & ex


def test_own_suite_still_asks_heldout_types():
    ids = {i for it in own_suite() for i in it["instruction_id_list"]}
    assert set(DEFAULT_HELDOUT_TYPES) <= ids


def test_bad_heldout_lists_are_refused():
    assert check_heldout_types(["change_case:english_lowercase"]) == []
    assert "is not an instruction id" in check_heldout_types(["keywords:nonsense"])[0]
    assert "nothing left" in check_heldout_types(list(GENERATED_IDS))[0]
    with pytest.raises(ValueError, match="keywords:nonsense"):
        make_item({"id": "t", "task": "Say hi."}, seed=0, exclude=["keywords:nonsense"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["eval.heldout_types=[keywords:frequency, keywords:frequency]"])
    with pytest.raises(ConfigError, match="category:name"):
        load_config(None, ["eval.heldout_types=[lowercase]"])


def test_pair_builder_draws_none_of_the_configured_heldout_types(tmp_path):
    """pair_builder's instruction gathering honours a custom eval.heldout_types (not only the default list), and
    a changed list is a different instruction set (its own cache file)."""
    from pair_builder.__main__ import gather_instructions
    from shared.config import load_config

    custom = ["punctuation:no_comma", "change_case:english_lowercase", "detectable_format:json_format"]
    cfg = load_config(None, ["pairs.sources=[seed]", "pairs.seed_variants=3", f"eval.heldout_types={custom}"])
    ins = gather_instructions(cfg, [], tmp_path, {})
    drawn = {c.id for i in ins for c in i.constraints}
    assert ins and not drawn & set(custom)
    default = gather_instructions(load_config(None, ["pairs.sources=[seed]", "pairs.seed_variants=3"]), [], tmp_path, {})
    assert {c.id for i in default for c in i.constraints} & set(custom)  # drawn when not held out
    assert len(list(tmp_path.glob("instructions-*.jsonl"))) == 2
