"""The vLLM command line we build, flag by flag (no vLLM needed); supervision is in tests/integration."""

from __future__ import annotations

import sys

import pytest

from gen_server.vllm_backend import VllmOptions, build_vllm_command, health_url, vllm_env


def flag_value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} appears {cmd.count(flag)} times in {cmd}"
    return cmd[cmd.index(flag) + 1]


def test_defaults_start_the_openai_server_with_explicit_settings():
    cmd = build_vllm_command(VllmOptions(model="/models/m"))
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(cmd, "--model") == "/models/m"
    assert flag_value(cmd, "--host") == "127.0.0.1"
    assert flag_value(cmd, "--port") == "8000"
    assert flag_value(cmd, "--dtype") == "auto"
    assert flag_value(cmd, "--gpu-memory-utilization") == "0.9"
    assert flag_value(cmd, "--seed") == "0"
    assert flag_value(cmd, "--tensor-parallel-size") == "1"
    assert flag_value(cmd, "--data-parallel-size") == "1"
    for absent in (
        "--quantization",
        "--api-key",
        "--served-model-name",
        "--max-model-len",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
    ):
        assert absent not in cmd


def test_fp8_quantization_and_none():
    assert flag_value(build_vllm_command(VllmOptions(model="m", quantization="fp8")), "--quantization") == "fp8"
    assert "--quantization" not in build_vllm_command(VllmOptions(model="m", quantization="none"))


def test_parallelism_memory_and_length():
    cmd = build_vllm_command(
        VllmOptions(
            model="m",
            tensor_parallel_size=4,
            data_parallel_size=2,
            gpu_memory_utilization=0.85,
            max_model_len=8192,
            seed=7,
            dtype="bfloat16",
        )
    )
    assert flag_value(cmd, "--tensor-parallel-size") == "4"
    assert flag_value(cmd, "--data-parallel-size") == "2"
    assert flag_value(cmd, "--gpu-memory-utilization") == "0.85"
    assert flag_value(cmd, "--max-model-len") == "8192"
    assert flag_value(cmd, "--seed") == "7"
    assert flag_value(cmd, "--dtype") == "bfloat16"


@pytest.mark.parametrize(
    ("enabled", "present", "absent"),
    [
        (True, "--enable-prefix-caching", "--no-enable-prefix-caching"),
        (False, "--no-enable-prefix-caching", "--enable-prefix-caching"),
    ],
)
def test_prefix_caching_on_and_off(enabled, present, absent):
    cmd = build_vllm_command(VllmOptions(model="m", enable_prefix_caching=enabled))
    assert present in cmd and absent not in cmd


def test_api_key_served_name_and_passthrough_last_and_verbatim():
    extra = ["--max-num-seqs", "256", "--port", "9999"]
    cmd = build_vllm_command(
        VllmOptions(
            model="m", host="0.0.0.0", port=8123, api_key="s3cret", served_model_name="policy", extra_args=extra
        )
    )
    assert flag_value(cmd, "--api-key") == "s3cret"
    assert flag_value(cmd, "--served-model-name") == "policy"
    assert flag_value(cmd, "--host") == "0.0.0.0"
    # Passed through untouched and last, so a user's flag overrides ours (argparse: last one wins).
    assert cmd[-len(extra) :] == extra


def test_env_defaults_only_fill_unset_variables():
    env = vllm_env({"VLLM_USE_FLASHINFER_SAMPLER": "1", "PATH": "/bin"})
    assert env == {"VLLM_USE_FLASHINFER_SAMPLER": "1", "VLLM_NO_USAGE_STATS": "1", "PATH": "/bin"}


def test_health_url_reaches_wildcard_binds_through_loopback():
    assert health_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/health"
    assert health_url("::", 8000) == "http://[::1]:8000/health"
    assert health_url("10.0.0.5", 81) == "http://10.0.0.5:81/health"
