"""Validate a pair_builder config completely before any request, and connect to the generation servers.

:func:`check_config` collects every problem - cross-field settings, the constitution, the template, the
seed tasks, the user file - and raises one :class:`~shared.config.ConfigError`. :func:`connect` then
checks every server's ``/health`` and ``/v1/models`` (and, with ``ref_logprobs``, that it echoes
log-probs) so an unreachable or mismatched server fails in seconds with a message naming the fix.
"""

from __future__ import annotations


import logging
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import openai

from pair_builder.constitution import Constitution, ConstitutionError, load_constitution
from pair_builder.sources import file_instructions
from shared.client import ServerUnavailable, make_client, served_models, wait_for_health
from shared.config import Config, ConfigError
from shared.prompting import BaseTemplate, load_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    constitution: Constitution
    template: BaseTemplate
    servers: list[str]
    api_key: str | None


def server_urls(cfg: Config) -> list[str]:
    return list(cfg.pairs.servers) or [cfg.server.base_url]


def check_config(cfg: Config) -> Checked:
    """Every problem of the pairs settings at once (nothing is sent to a server here)."""
    p = cfg.pairs
    problems: list[str] = []
    if not p.sources:
        problems.append("pairs.sources: empty; use any of seed, self_instruct, file")
    if len(set(p.sources)) != len(p.sources):
        problems.append("pairs.sources: lists a source twice")
    if "file" in p.sources and p.input_file is None:
        problems.append("pairs.sources has 'file' but pairs.input_file is not set")
    if p.input_file is not None and "file" not in p.sources:
        problems.append("pairs.input_file is set but 'file' is not in pairs.sources (add it, or unset the file)")
    if "self_instruct" in p.sources and p.self_instruct_tasks == 0:
        problems.append("pairs.sources has 'self_instruct' but pairs.self_instruct_tasks is 0")
    if p.k + p.revisions < 2:
        problems.append(f"pairs.k={p.k} with pairs.revisions={p.revisions} gives one candidate; a pair needs two "
                        f"(raise k or revisions)")
    if p.min_chars > p.max_chars:
        problems.append(f"pairs.min_chars={p.min_chars} > pairs.max_chars={p.max_chars}")
    if p.min_edit_distance > p.max_edit_distance:
        problems.append(f"pairs.min_edit_distance={p.min_edit_distance} > pairs.max_edit_distance={p.max_edit_distance}")
    if 0 < p.copy_span < 4:
        problems.append(f"pairs.copy_span={p.copy_span}: runs of fewer than 4 words are everyday phrases, not copies "
                        f"(use 0 to turn the check off; 8 is the measured default)")
    if p.no_constraint_rule != "drop" and p.revisions == 0 and "file" in p.sources:
        problems.append(f"pairs.no_constraint_rule={p.no_constraint_rule} needs rewrites (pairs.revisions >= 1)")
    urls = server_urls(cfg)
    for u in urls:
        parsed = urlparse(u)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            problems.append(f"pairs.servers: {u!r} is not an http(s) URL like http://10.0.0.5:8000")
    if len(set(urls)) != len(urls):
        problems.append("pairs.servers: lists a server twice (each URL gets its own in-flight budget)")
    constitution = template = None
    try:
        constitution = load_constitution(p.constitution)
    except ConstitutionError as e:
        problems.extend(f"constitution: {x}" for x in e.problems)
    try:
        template = load_template(cfg.model.template)
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"model.template: {e}")
    if "seed" in p.sources or "self_instruct" in p.sources:
        from shared.tasks import load_tasks

        try:
            load_tasks(p.seed_tasks)
        except (OSError, ValueError) as e:
            problems.append(f"pairs.seed_tasks: {e}")
    if "file" in p.sources and p.input_file is not None:
        try:
            file_instructions(p.input_file)
        except (OSError, ValueError) as e:
            problems.append(f"pairs.input_file: {e}")
    if problems:
        raise ConfigError(problems, "pairs config")
    assert constitution is not None and template is not None
    api_key = p.api_key or cfg.server.api_key or os.environ.get("GEN_SERVER_API_KEY")
    return Checked(constitution, template, urls, api_key)


@dataclass(frozen=True)
class ServedModel:
    name: str
    revision: str
    root: str


def connect(urls: list[str], api_key: str | None, *, model: str | None, revision: str | None,
            health_timeout: float = 30.0, probe_logprobs: bool = True) -> ServedModel:
    """Check every server is healthy, serves the same model, and (optionally) echoes log-probs."""
    found: dict[str, tuple[str, str]] = {}
    for url in urls:
        try:
            wait_for_health(url, timeout=health_timeout)
        except ServerUnavailable as e:
            raise ServerUnavailable(f"pair_builder: {e}") from None
        data = served_models(url, api_key)
        names = [m["id"] for m in data]
        if model is not None and model not in names:
            raise ServerUnavailable(f"gen_server at {url} serves {names}, not pairs.model={model!r}; "
                                    f"fix pairs.model or start the server with --served-model-name {model}")
        entry = next(m for m in data if m["id"] == (model or names[0]))
        found[url] = (entry["id"], str(entry.get("root") or entry["id"]))
    if len(set(found.values())) > 1:
        raise ServerUnavailable(f"pairs.servers serve different models {found}; all replicas must hold the same weights")
    name, root = next(iter(found.values()))
    if probe_logprobs:
        for url in urls:
            try:
                resp = make_client(url, api_key, timeout=60, max_retries=2).completions.create(
                    model=name, prompt="Hello world", max_tokens=0, echo=True, logprobs=1)
            except openai.APIError as e:
                raise ServerUnavailable(f"{url} answers /health but not a completion request ({type(e).__name__}: "
                                        f"{str(e)[:200]}): it is stalled or failing; see its log") from None
            lp = resp.choices[0].logprobs if resp.choices else None
            if lp is None or not lp.token_logprobs or not lp.text_offset:
                raise ServerUnavailable(f"{url} does not return echo log-probs (needed for pairs.ref_logprobs and "
                                        f"pairs.min_pmi); serve with gen_server (embedded or vLLM) or set "
                                        f"pairs.ref_logprobs=false and pairs.min_pmi=null")
    # The served root (the model dir) tells round k's weights from round k+1's even under one served name.
    return ServedModel(name, revision or root, root)
