"""cluster.yaml is the config `ray up` starts for server.placement=ray: the pieces the pipeline relies on."""

import re
import tomllib
from pathlib import Path

import yaml

from shared.config import ServerConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "cluster.yaml").read_text()
CLUSTER = yaml.safe_load(TEXT)
TYPES = CLUSTER["available_node_types"]
HEAD = TYPES[CLUSTER["head_node_type"]]
WORKERS = [t for name, t in TYPES.items() if name != CLUSTER["head_node_type"]]


def test_replicas_go_to_the_gpu_workers_and_never_to_the_head():
    server = ServerConfig()
    assert WORKERS
    assert not HEAD["resources"].get("GPU") and server.ray_resource not in HEAD["resources"]  # the trainer's GPU
    for w in WORKERS:  # the resource name the actors ask for, and the GPUs one vLLM replica takes
        assert w["resources"].get(server.ray_resource, 0) >= 1
        assert w["resources"].get("GPU", 0) >= server.tensor_parallel_size * w["resources"][server.ray_resource]
        assert w["min_workers"] >= 1


def test_each_side_installs_its_extras_and_the_pinned_ray():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"serve", "train"} <= set(extras)
    assert any('".[train]"' in c for c in CLUSTER["head_setup_commands"])
    assert any('".[serve]"' in c for c in CLUSTER["worker_setup_commands"])
    assert any("pip install" in c and "-e ." in c for c in CLUSTER["setup_commands"])  # ray[default] pinned there
    assert CLUSTER["file_mounts"].get("~/selfalign") == "."


def test_dashboard_on_localhost_and_no_hand_started_server():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--port=6379" in head
    assert "$RAY_HEAD_IP:6379" in " ".join(CLUSTER["worker_start_ray_commands"])
    starts = " ".join(CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"])
    assert "gen_server" not in starts  # the pipeline starts the replicas as Ray actors
    assert "venv/bin:$PATH" in head  # the pairs job's `python` is the venv's


def test_the_documented_command_is_a_valid_pipeline_config():
    cmd = re.search(r"python -m pipeline run --config (\S+) \\\n#\s+(.*) \\\n#\s+(.*)\n", TEXT)
    assert cmd, "cluster.yaml's comments show the pipeline command"
    path, overrides = cmd.group(1), (cmd.group(2) + " " + cmd.group(3)).split()
    cfg = load_config(REPO / path, overrides)
    assert cfg.server.placement == "ray" and cfg.pipeline.pairs_runner == "ray_job" and cfg.server.replicas == "auto"
    assert cfg.server.ray_address is None  # on the head: the local cluster
