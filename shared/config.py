"""Typed configuration: one YAML file plus ``a.b=c`` command-line overrides, validated all at once.

Every stage reads the same :class:`Config`; each section is a pydantic model with help text and checks, and
unknown keys are errors (a typo must not silently fall back to a default). :func:`load_config` collects
every problem - unreadable YAML, malformed overrides, wrong types, unknown keys - and raises one
:class:`ConfigError` listing them all, before any expensive work starts.

    cfg = load_config("configs/demo-cpu.yaml", ["server.port=8123", "cost.gpu_usd_per_hour=1.74"])
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.atomic import atomic_write_text


class ConfigError(ValueError):
    """The config is wrong; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("demo", description="Run name: outputs go to <root>/<name>/round-<k>/.")
    root: Path = Field(Path("runs"), description="Directory that holds all runs.")

    @field_validator("name")
    @classmethod
    def _name_is_a_dir_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain directory name (no '/')")
        return v


class ServerConfig(Section):
    backend: Literal["auto", "embedded", "vllm"] = Field(
        "auto", description="auto: vllm when CUDA and vllm are present, else the embedded CPU server."
    )
    model: str = Field(
        "smollm2-135m", description="Model directory, or a packaged model name (see gen_server.models)."
    )
    host: str = Field("127.0.0.1", description="Bind address; keep loopback unless the API key is set.")
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, description="Bearer key the server requires; env GEN_SERVER_API_KEY.")
    served_model_name: str | None = Field(None, description="Name clients send as `model`; default: dir name.")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; lower saves KV-cache memory.")
    seed: int = 0
    # embedded only
    max_batch_size: int = Field(16, ge=1, description="Embedded: sequences decoded together; higher = more throughput, more RAM.")
    # vllm only
    quantization: Literal["none", "fp8"] = Field("none", description="vLLM: fp8 = ~1.2x throughput, half the weight memory.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = Field(True, description="vLLM: reuse the shared few-shot prefix across requests.")
    extra_args: list[str] = Field(default_factory=list, description="Passed to `vllm serve` verbatim.")
    health_timeout_s: float = Field(900.0, gt=0, description="How long to wait for /health after start.")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ClientConfig(Section):
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout; long generations need minutes on CPU.")
    max_retries: int = Field(6, ge=0, description="Retries on connection errors, 408/409/429 and 5xx (exp. backoff + jitter).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight per server; vLLM needs hundreds to stay full.")


class CostConfig(Section):
    gpu_usd_per_hour: float = Field(0.0, ge=0, description="Price of the machine (e.g. 1.74 for an A100 SXM 80GB).")
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly once the ledger reaches this.")


class ModelConfig(Section):
    base: str = Field("smollm2-135m", description="The round-0 model: a 16-bit HF dir or a packaged model name.")
    allow_instruct: bool = Field(
        False, description="Start from a model eval.base_check calls INSTRUCT (the packaged demo model is one)."
    )
    template: Path | None = Field(None, description="Base-model prompt template; default constitution/base_template.yaml.")


class EvalConfig(Section):
    suite: str = Field("own", description="ifeval (541 prompts) | own (generated, held-out split) | path/to/suite.jsonl")
    limit: int | None = Field(None, ge=1, description="Score only the first N prompts (quick checks).")
    prompt_style: Literal["base", "chat"] = Field("base", description="base: few-shot template via /v1/completions.")
    max_tokens: int = Field(512, ge=1, description="Longer answers cost time; too short truncates and fails length checks.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy: the same model gives the same score.")
    concurrency: int = Field(16, ge=1, description="Requests in flight; vLLM wants hundreds, the CPU server ~batch size.")
    gate_metric: Literal["prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"] = "prompt_loose"
    target: float = Field(0.95, ge=0.0, le=1.0, description="The plan's success rate: stop when reached.")


class Config(Section):
    """The whole pipeline's config. Later stages add their own sections here."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key (check the spelling; see the config reference in configs/)")
        else:
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return problems


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    cls: type[C] = Config,  # type: ignore[assignment]
) -> C:
    """Load ``path`` (YAML), apply ``a.b=c`` overrides (values parsed as YAML), validate everything."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"file not found: {p} (pass an existing YAML file, e.g. configs/demo-cpu.yaml)"], source)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(loaded).__name__}"], source)
        data = loaded
    for ov in overrides or []:
        key, sep, raw = ov.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {ov!r}: expected the form section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # a plain string that merely looks odd to YAML
        _set_dotted(data, key, value)
    try:
        cfg = cls.model_validate(data)
    except ValidationError as e:
        problems.extend(_format_validation_error(e))
        cfg = None
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config (defaults filled in) atomically; reloading it gives the same config."""
    return atomic_write_text(path, dump_config(cfg))


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--config CFG`` plus trailing ``a.b=c`` overrides, the way every stage's CLI takes them."""
    parser.add_argument("--config", required=required, help="YAML config file (see configs/).")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="Override a config value.")


def config_from_args(args: argparse.Namespace, cls: type[C] = Config) -> C:  # type: ignore[assignment]
    return load_config(args.config, args.overrides, cls)
