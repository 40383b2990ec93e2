"""pair_builder config checks: every problem at once, before any request; unreachable servers named."""

import pytest

from gen_server.process import free_port
from pair_builder.settings import check_config, connect
from shared.client import ServerUnavailable
from shared.config import ConfigError, load_config


def test_defaults_pass():
    checked = check_config(load_config(None, []))
    assert checked.servers == ["http://127.0.0.1:8000"] and len(checked.constitution.principles) >= 6


def test_every_problem_is_reported_at_once(tmp_path):
    (tmp_path / "p.yaml").write_text("id: x\n")
    cfg = load_config(None, [
        "pairs.sources=[seed, file, self_instruct]", "pairs.k=1", "pairs.revisions=0", "pairs.min_chars=10",
        "pairs.max_chars=5", "pairs.min_edit_distance=0.5", "pairs.max_edit_distance=0.1",
        "pairs.servers=[localhost:8000, http://a:1, http://a:1]", f"pairs.constitution={tmp_path}",
    ])
    with pytest.raises(ConfigError) as ei:
        check_config(cfg)
    text = "\n".join(ei.value.problems)
    for needle in ("'file' but pairs.input_file is not set", "self_instruct_tasks is 0", "gives one candidate",
                   "min_chars=10 > pairs.max_chars=5", "min_edit_distance=0.5", "'localhost:8000' is not an http",
                   "lists a server twice", "constitution: p.yaml: description: Field required"):
        assert needle in text, needle


def test_bad_user_file_is_found_before_requests(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text('{"nothing": 1}\n')
    cfg = load_config(None, ["pairs.sources=[file]", f"pairs.input_file={f}"])
    with pytest.raises(ConfigError, match="row 1: needs a non-empty 'instruction' or 'task'"):
        check_config(cfg)


def test_impossible_settings_rejected_by_the_config():
    with pytest.raises(ConfigError, match="pairs.max_constraints"):
        load_config(None, ["pairs.max_constraints=5"])
    with pytest.raises(ConfigError, match="pairs.colour: unknown key"):
        load_config(None, ["pairs.colour=red"])


def test_unreachable_server_names_gen_server_and_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable) as ei:
        connect([url], None, model=None, revision=None, health_timeout=0.5)
    assert url in str(ei.value) and "gen_server" in str(ei.value)
