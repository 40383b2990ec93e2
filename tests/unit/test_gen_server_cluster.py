"""gen_server.cluster's placement arithmetic, and the pipeline's choice of start/stop and job address (no Ray)."""

import sys

import pytest
import ray

from gen_server import cluster
from shared.config import ServerConfig


def test_actor_options_ask_for_the_replicas_gpus_and_one_resource_unit():
    vllm = ServerConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=2)
    assert cluster.actor_options(vllm) | {"scheduling_strategy": None} == {
        "num_cpus": 0, "num_gpus": 4, "max_restarts": 0, "resources": {"gen_server": 1}, "scheduling_strategy": None}
    cpu = ServerConfig(backend="embedded", ray_resource=None)
    assert cluster.actor_options(cpu)["num_gpus"] == 0 and cluster.actor_options(cpu)["resources"] == {}


@pytest.mark.parametrize("server, have, n", [
    (ServerConfig(replicas=3), {}, 3),
    (ServerConfig(replicas="auto"), {"gen_server": 4.0, "GPU": 8.0}, 4),
    (ServerConfig(replicas="auto", ray_resource=None, backend="vllm", tensor_parallel_size=2), {"GPU": 7.0}, 3),
    (ServerConfig(replicas="auto"), {"GPU": 8.0}, 1),  # no gen_server unit yet (an autoscaler adds them): one
])
def test_replica_count(monkeypatch, server, have, n):
    monkeypatch.setattr(ray, "cluster_resources", lambda: have)
    assert cluster.replica_count(server) == n


def test_pipeline_places_by_server_placement_and_jobs_go_to_the_servers_cluster(tmp_path, monkeypatch):
    from gen_server.process import start_replicas, stop_all
    from pipeline.run import _placement, pairs_command
    from shared.config import load_config

    local = load_config(None, [])
    assert _placement(local) == (start_replicas, stop_all)
    on_ray = load_config(None, ["server.placement=ray", "pipeline.pairs_runner=ray_job"])
    assert _placement(on_ray) == (cluster.start_on_ray, cluster.stop_on_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    urls = ["http://10.0.0.7:41001", "http://10.0.0.8:41002"]
    cmd, env = pairs_command(on_ray, tmp_path / "config.yaml", 1, urls, "k", "http://127.0.0.1:8265")
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265" and env == {}
    assert f"pairs.servers=[{','.join(urls)}]" in cmd
    assert cmd[-1] == "pairs.ray_address=auto"  # the job's driver joins the cluster it runs on
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")  # an explicit address wins
    cmd, _ = pairs_command(on_ray, tmp_path / "config.yaml", 1, urls, "k", "http://127.0.0.1:8265")
    assert cmd[cmd.index("--address") + 1] == "http://10.0.0.1:8265"
    cmd, _ = pairs_command(local, tmp_path / "config.yaml", 1, urls, "k")
    assert cmd[:3] == [sys.executable, "-m", "pair_builder"] and "pairs.ray_address=auto" not in cmd
