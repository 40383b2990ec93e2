"""Record schemas exchanged between stages through files.

A preference pair (one row of ``round-<k>/pairs/*.parquet``) is loadable with
``datasets.load_dataset("parquet", data_dir=...)`` and usable by TRL's DPOTrainer unchanged: ``prompt``,
``chosen``, ``rejected`` are plain strings (the prompt is exactly the rendered base-model template), the
rest is provenance. ``ref_chosen_logps`` / ``ref_rejected_logps`` are optional: the reference model's summed
log-probabilities of each response given the prompt, scored by the server that holds the 16-bit model,
so the trainer can skip its own reference pass.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PAIR_COLUMNS = (
    "id", "prompt", "chosen", "rejected", "instruction_id", "constraints", "principle_id",
    "chosen_passed", "rejected_passed", "model", "round",
)
REF_LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class Constraint(BaseModel):
    """One verifiable constraint: an IFEval instruction id and its kwargs (JSON-encoded in parquet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, description="e.g. 'punctuation:no_comma'")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PairRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, description="content hash, see pair_id()")
    prompt: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    instruction_id: str
    constraints: str = Field("[]", description="JSON list of Constraint dicts")
    principle_id: str
    chosen_passed: int = Field(ge=0, description="constraints the chosen response satisfies")
    rejected_passed: int = Field(ge=0)
    model: str
    round: int = Field(ge=0)
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None


STOP_KIND = "stop"
REPAIR_KIND = "repair"
CONTRAST_PREFIX = "contrast:"


def is_extra(principle_id: str | None) -> bool:
    """True for an extra pair (pair_builder.extras), whose ``principle_id`` names the rule that made it: it need
    not pass more constraints than its rejected answer."""
    return principle_id in (STOP_KIND, REPAIR_KIND) or (principle_id or "").startswith(CONTRAST_PREFIX)


def content_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts: the same content gives the same id in every process."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def pair_id(instruction: str, constraints: list[Constraint], principle_id: str, sampling: dict[str, Any],
            model_revision: str) -> str:
    return content_hash(instruction, [c.model_dump() for c in constraints], principle_id, sampling, model_revision)
