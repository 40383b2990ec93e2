"""The serving backend registry (gen_server.backends): auto choice, options only one backend understands, the
flags a ServerConfig becomes, and a third backend added through the seam."""

import pytest

from gen_server import backends
from gen_server.__main__ import _validate, build_parser
from gen_server.process import ServerProcess
from shared.config import ServerConfig


def _avail(monkeypatch, **why_not):
    for name, why in why_not.items():
        b = backends.BACKENDS[name]
        monkeypatch.setitem(backends.BACKENDS, name, backends.Backend(**{**b.__dict__, "unavailable": lambda w=why: w}))


def test_auto_takes_vllm_on_a_gpu_and_says_why_it_did_not(monkeypatch):
    _avail(monkeypatch, vllm=None, embedded=None)
    assert backends.choose() == ("vllm", "a CUDA GPU is visible and vllm is installed")
    _avail(monkeypatch, vllm="no CUDA GPU is visible", embedded=None)
    assert backends.choose() == ("embedded", "no CUDA GPU is visible")
    _avail(monkeypatch, vllm="vllm is not installed", embedded="torch is not installed")
    with pytest.raises(RuntimeError, match="no serving backend can run here: vllm is not installed; torch is not"):
        backends.choose()


def test_options_of_the_other_backend_are_refused_by_name(tiny_model_dir):
    def problems(*argv, passthrough=()):
        return _validate(build_parser().parse_args(["--model", str(tiny_model_dir), *argv]), list(passthrough))

    assert problems("--backend", "embedded", "--quantization", "fp8", passthrough=["--max-num-seqs", "8"]) == [
        "--quantization, arguments after -- only apply to --backend vllm"]
    assert problems("--backend", "vllm", "--max-batch-size", "4") == ["--max-batch-size only apply to --backend "
                                                                      "embedded"]
    assert problems("--backend", "vllm", "--gpu-memory-utilization", "0.5", passthrough=["--enforce-eager"]) == []


def test_a_config_becomes_only_its_backends_flags():
    emb = ServerProcess.from_config(ServerConfig(backend="embedded", max_batch_size=4), "m").extra_args
    assert "--max-batch-size" in emb and "--quantization" not in emb and "--" not in emb
    vl = ServerProcess.from_config(ServerConfig(backend="vllm", extra_args=["--enforce-eager"]), "m").extra_args
    assert "--gpu-memory-utilization" in vl and "--max-batch-size" not in vl
    assert vl[vl.index("--") + 1:] == ["--enforce-eager"]


def test_a_third_backend_is_one_registration(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    monkeypatch.setattr(backends, "PREFERENCE", list(backends.PREFERENCE))
    served = []
    backends.register(backends.Backend(
        "echo", unavailable=lambda: None, run=lambda args, d, name, rest: served.append((d, args.port)) or 0,
        config_args=lambda s: ["--max-batch-size", "1"], only=()))
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.BACKENDS["echo"])
    assert "echo" in build_parser()._option_string_actions["--backend"].choices
    # the options that belong to the others are refused for it too
    args = build_parser().parse_args(["--model", str(tiny_model_dir), "--backend", "echo", "--quantization", "fp8"])
    assert _validate(args, []) == ["--quantization only apply to --backend vllm"]
    from gen_server.__main__ import main

    assert main(["--model", str(tiny_model_dir), "--backend", "echo", "--port", "18123"]) == 0
    assert served == [(tiny_model_dir, 18123)]
    with pytest.raises(ValueError, match="unknown serving backend 'nope'; known: embedded, vllm, echo"):
        backends.get("nope")


def test_the_cli_is_made_from_the_server_config():
    from typing import get_args

    from gen_server.__main__ import AFTER_DASHDASH, DEST, PIPELINE_ONLY, server_settings

    opts = build_parser()._option_string_actions
    assert "--replicas" not in opts
    for name, f in ServerConfig.model_fields.items():
        if name in AFTER_DASHDASH | PIPELINE_ONLY:
            continue
        action = opts["--" + DEST.get(name, name).replace("_", "-")]
        assert f.description.split(";")[0] in action.help
        if name == "dtype":
            assert list(action.choices) == list(get_args(f.annotation))
    # a config -> the command ServerProcess runs -> the CLI's own parse gives the same settings back
    for backend in ("embedded", "vllm"):
        cfg = ServerConfig(backend=backend, dtype="float32", max_model_len=1024, seed=3, max_batch_size=4,
                           gpu_memory_utilization=0.5, enable_prefix_caching=False, health_timeout_s=60)
        proc = ServerProcess.from_config(cfg, "m", port=8123)
        cmd = proc.command()[3:]
        cmd = cmd[:cmd.index("--")] if "--" in cmd else cmd
        got, problems = server_settings(build_parser().parse_args(cmd))
        assert problems == []
        mine = set(backends.get(backend).only)
        for name in ("dtype", "max_model_len", "seed", "max_batch_size", "gpu_memory_utilization",
                     "enable_prefix_caching", "health_timeout_s"):
            if DEST.get(name, name) in mine or not any(DEST.get(name, name) in b.only
                                                       for b in backends.BACKENDS.values()):
                assert getattr(got, name) == getattr(cfg, name), (backend, name)


def test_bad_values_are_all_named_at_once_by_the_schema(tiny_model_dir):
    args = build_parser().parse_args(["--model", str(tiny_model_dir), "--port", "0", "--max-model-len", "8",
                                      "--gpu-memory-utilization", "1.5", "--max-n", "0"])
    assert _validate(args, []) == ["--port must be >= 1, got 0", "--max-model-len must be >= 16, got 8",
                                   "--gpu-memory-utilization must be <= 1.0, got 1.5", "--max-n must be >= 1, got 0"]


def test_replica_devices_pin_each_replica_to_its_gpus(monkeypatch):
    from gen_server.process import replica_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert replica_devices(2, 1, 2) == ["0", "1"]
    assert replica_devices("auto", 1, 4) == ["0", "1", "2", "3"]
    assert replica_devices("auto", 2, 4) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="needs 2 GPUs; 1 visible"):  # not even one replica of TP 2
        replica_devices("auto", 2, 1)
    with pytest.raises(ValueError, match="needs 4 GPUs; 2 visible"):
        replica_devices(2, 2, 2)
    assert replica_devices(3, 1, 0) == [None, None, None]  # CPU: embedded servers, nothing to pin
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # a job given GPUs 4 and 6: replicas get those
    assert replica_devices("auto", 1, 2) == ["4", "6"]


def test_a_replica_holds_its_tensor_times_data_parallel_gpus():
    from gen_server.process import gpus_per_replica, replica_devices
    from shared.config import ServerConfig

    s = ServerConfig(backend="vllm", tensor_parallel_size=2, data_parallel_size=2)
    assert gpus_per_replica(s) == 4
    assert replica_devices("auto", gpus_per_replica(s), 8) == ["0,1,2,3", "4,5,6,7"]
    with pytest.raises(ValueError, match="needs 8 GPUs; 4 visible"):
        replica_devices(2, gpus_per_replica(s), 4)
    assert gpus_per_replica(ServerConfig(backend="embedded", tensor_parallel_size=2)) == 0
