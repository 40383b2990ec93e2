"""Cross-section checks of the held-out instruction types (before a run starts)."""

import pytest

from eval.constraints import GENERATED_IDS
from pipeline.validate import validate_pipeline
from shared.config import ConfigError, load_config


def test_default_heldout_types_pass():
    validate_pipeline(load_config(None), None)


def test_unknown_or_all_heldout_types_are_refused():
    cfg = load_config(None, ["eval.heldout_types=[keywords:nonsense, startend:quotation]"])
    with pytest.raises(ConfigError, match="'keywords:nonsense' is not an instruction id"):
        validate_pipeline(cfg, None)
    cfg = load_config(None, [f"eval.heldout_types=[{', '.join(GENERATED_IDS)}]"])
    with pytest.raises(ConfigError, match="nothing left to train on"):
        validate_pipeline(cfg, None)


@pytest.mark.parametrize("content,match", [
    ("", "holds no instructions"),
    ("\n\n", "holds no instructions"),
    ('{"instruction": ""}\n', "needs a non-empty 'instruction' or 'task'"),
])
def test_pair_inputs_are_checked_before_any_server_starts(tmp_path, content, match):
    f = tmp_path / "ins.jsonl"
    f.write_text(content)
    cfg = load_config(None, ["pairs.sources=[file]", f"pairs.input_file={f}"])
    with pytest.raises(ConfigError, match=match):
        validate_pipeline(cfg, None)
    cfg = load_config(None, [f"pairs.constitution={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="constitution"):
        validate_pipeline(cfg, None)


@pytest.mark.parametrize("path", sorted(str(p) for p in
                                        (__import__("pathlib").Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    validate_pipeline(cfg, None)  # everything but the model dir, which may live on another machine
