import pytest

from shared.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.server.port == 8000 and cfg.run.name == "demo"


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "run:\n  name: r1\nserver:\n  port: 9000\n")
    cfg = load_config(p, ["server.port=9100", "cost.gpu_usd_per_hour=1.74", "server.extra_args=[--enforce-eager]"])
    assert cfg.run.name == "r1"
    assert cfg.server.port == 9100  # override wins over the file
    assert cfg.cost.gpu_usd_per_hour == 1.74
    assert cfg.server.extra_args == ["--enforce-eager"]


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "server:\n  port: 99999\n  bakend: vllm\ncost:\n  gpu_usd_per_hour: -1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, ["noequals", "client.max_retries=many"])
    probs = ei.value.problems
    text = str(ei.value)
    assert len(probs) == 5, probs
    assert "server.port" in text and "server.bakend: unknown key" in text
    assert "cost.gpu_usd_per_hour" in text and "client.max_retries" in text
    assert "override 'noequals'" in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_run_name_must_be_plain(tmp_path):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name=../escape"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["server.port=8123", "run.name=x"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out) == cfg
    assert isinstance(load_config(out), Config)


def test_secrets_never_reach_a_saved_config_a_report_or_a_log(tmp_path, caplog):
    import logging

    from pipeline.run import _check_saved_config
    from shared.config import dump_config
    from shared.rundir import RunDir

    key = "k3y-that-must-not-leak"
    cfg = load_config(None, [f"server.api_key={key}", f"pairs.api_key={key}", f"run.root={tmp_path}", "run.name=x"])
    out = save_config(cfg, tmp_path / "config.yaml")
    assert key not in out.read_text() and key not in dump_config(cfg)
    assert "<redacted>" in dump_config(cfg)
    back = load_config(out)
    assert back.server.api_key is None and back.pairs.api_key is None
    assert back.model_copy(update={"server": cfg.server, "pairs": cfg.pairs}) == cfg  # all else round-trips

    rd = RunDir.from_config(cfg)
    _check_saved_config(rd, cfg)
    changed = load_config(None, [f"server.api_key={key}-2", "server.port=9001", f"run.root={tmp_path}", "run.name=x"])
    with caplog.at_level(logging.WARNING):
        _check_saved_config(rd, changed)
    assert "server.port" in caplog.text and key not in caplog.text  # a changed key is not a change worth a line
    assert key not in rd.config_path.read_text()


@pytest.mark.parametrize("text,match", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("pairs:\n  k: 2\neval:\n  limit: 3\npairs:\n  k: 4\n", r"'pairs' is given twice \(lines 1 and 5\)"),
    ("pairs:\n  k: 2\n  k: 3\n", "'k' is given twice"),
])
def test_empty_and_duplicate_configs_are_refused(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_a_binary_config_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xff\xfe\x00bin")
    with pytest.raises(ConfigError, match="not a text"):
        load_config(p)


def test_the_config_reference_is_current_and_complete():
    from pathlib import Path

    from shared.config import REFERENCE_PATH, config_reference

    ref = config_reference()
    doc = Path(__file__).resolve().parents[2] / REFERENCE_PATH
    assert doc.read_text() == ref, "docs/config.md is stale: python -m shared.config > docs/config.md"
    rows = [ln for ln in ref.splitlines() if ln.startswith("| `")]
    assert len(rows) > 100 and all(not ln.rstrip().endswith("|  |") for ln in rows)  # every key says what it does


def test_every_setting_has_a_description():
    """docs/config.md and `--help` show each key's help: a field without one is a gap in the reference."""
    from pydantic import BaseModel

    from shared.config import Config

    missing = []

    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation, f"{prefix}{name}.")
            elif not (f.description or "").strip():
                missing.append(prefix + name)

    walk(Config)
    assert not missing, missing
