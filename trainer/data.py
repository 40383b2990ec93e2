"""Pair dataset checks that run before any model loads: a GPU hour must never be spent on broken pairs.

    python -m trainer.data --config CFG [train.pairs_dir=DIR]     # prints the table, exit 1 on errors

:func:`validate_pairs` checks the schema and types, empty / identical / duplicate pairs, duplicate ids,
token lengths against ``max_length`` / ``max_prompt_length`` (how many rows TRL would truncate, and whether
the cut lands in the response or already in the prompt), that every prompt was rendered with the round's
base-model template, and that the rows belong to the round. It returns a :class:`DataReport` listing every
problem at once; ``trainer.dpo`` refuses a report with errors unless ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.prompting import BaseTemplate
from shared.records import PAIR_COLUMNS, REF_LOGP_COLUMNS, is_extra

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "id")
_STRING_COLUMNS = ("id", "prompt", "chosen", "rejected", "instruction_id", "constraints", "principle_id", "model")
_INT_COLUMNS = ("chosen_passed", "rejected_passed", "round")
_EXAMPLES = 3  # row ids quoted per problem

Severity = Literal["error", "warning"]


class PairsDataError(ValueError):
    """The pairs dataset cannot be read or refused validation; the message says what to fix."""


@dataclass
class Problem:
    check: str
    severity: Severity
    rows: int
    message: str
    examples: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    source: str
    rows: int
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, check: str, severity: Severity, rows: int, message: str, examples: list[str] | None = None) -> None:
        self.problems.append(Problem(check, severity, rows, message, (examples or [])[:_EXAMPLES]))

    def summary(self) -> str:
        """One plain-text block (for logs and exception messages)."""
        warnings = len(self.problems) - len(self.errors)
        head = f"{self.source}: {self.rows} rows, {len(self.errors)} error(s), {warnings} warning(s)"
        lines = [head] + [
            f"  [{p.severity}] {p.check}: {p.message}" + (f" (e.g. {', '.join(p.examples)})" if p.examples else "")
            for p in self.problems
        ]
        return "\n".join(lines)

    def print_table(self, file: Any = None) -> None:
        """The summary as a rich table: one row per check result, then the length statistics."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"pairs: {self.source} ({self.rows} rows)")
        table.add_column("check")
        table.add_column("status")
        table.add_column("rows", justify="right")
        table.add_column("detail", overflow="fold")
        failed = {p.check for p in self.problems}
        for p in self.problems:
            style = "red" if p.severity == "error" else "yellow"
            detail = p.message + (f" e.g. {', '.join(p.examples)}" if p.examples else "")
            table.add_row(p.check, f"[{style}]{p.severity}[/{style}]", str(p.rows), detail)
        for check in CHECKS:
            if check not in failed:
                table.add_row(check, "[green]ok[/green]", "0", "")
        for k, v in self.stats.items():
            table.add_row(f"stat: {k}", "", "", str(v))
        Console(file=file or sys.stderr).print(table)


CHECKS = ("schema", "empty", "identical", "duplicate_pair", "duplicate_id", "template", "round",
          "prompt_too_long", "prompt_fills_max_length", "response_truncated", "ref_logps", "passed_counts")


def load_pairs(pairs_dir: str | Path) -> Dataset:
    """All ``*.parquet`` shards under ``pairs_dir`` as one :class:`datasets.Dataset`."""
    from datasets import load_dataset

    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        raise PairsDataError(
            f"pairs dir not found: {pairs_dir} (build it with `python -m pair_builder --config CFG`, "
            "or set train.pairs_dir=DIR)"
        )
    shards = sorted(str(p) for p in pairs_dir.rglob("*.parquet"))
    if not shards:
        raise PairsDataError(f"no *.parquet shards in {pairs_dir}; is pair building finished?")
    return load_dataset("parquet", data_files=shards, split="train")


def split_eval(ds: Dataset, eval_split: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) rows: ``eval_split`` of the checker pairs held out (None when that rounds to 0).
    Extra pairs (:func:`shared.records.is_extra`: stop pairs, format repairs, habit contrasts) all train: they are easy by
    construction, and in the held-out set they would inflate the reward accuracy the run reports."""
    from datasets import concatenate_datasets

    extra = ([is_extra(p) for p in ds["principle_id"]] if "principle_id" in ds.column_names
             else [False] * ds.num_rows)
    checker = [i for i, e in enumerate(extra) if not e]
    n_eval = int(len(checker) * eval_split)
    if n_eval < 1:
        return ds, None
    split = ds.select(checker).train_test_split(test_size=n_eval, seed=seed)
    extras = [i for i, e in enumerate(extra) if e]
    train = concatenate_datasets([split["train"], ds.select(extras)]) if extras else split["train"]
    return train, split["test"]


def template_frame(template: BaseTemplate) -> tuple[str, str]:
    """(prefix, suffix) every prompt rendered with ``template`` has: preamble + examples + query prefix,
    and the answer prefix the response follows."""
    marker = "\x00"
    rendered = template.render(marker)
    return rendered[: rendered.index(marker)], rendered[rendered.index(marker) + 1 :]


def _dtype(features: Any, col: str) -> str:
    return str(getattr(features[col], "dtype", type(features[col]).__name__))


def _check_schema(ds: Dataset, report: DataReport) -> bool:
    """Types and presence; returns False when the text checks cannot run at all."""
    cols = set(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        report.add("schema", "error", ds.num_rows, f"missing required column(s) {missing}; pair records need "
                   f"{list(REQUIRED_COLUMNS)} (see shared/records.py)")
    provenance = [c for c in PAIR_COLUMNS if c not in cols and c not in REQUIRED_COLUMNS]
    if provenance:
        report.add("schema", "warning", 0, f"missing provenance column(s) {provenance}")
    wrong = []
    for c in _STRING_COLUMNS:
        if c in cols and _dtype(ds.features, c) not in ("string", "large_string"):
            wrong.append(f"{c}: {_dtype(ds.features, c)} (want string)")
    for c in _INT_COLUMNS:
        if c in cols and not _dtype(ds.features, c).startswith(("int", "uint")):
            wrong.append(f"{c}: {_dtype(ds.features, c)} (want int)")
    for c in REF_LOGP_COLUMNS:
        if c in cols and not _dtype(ds.features, c).startswith("float"):
            wrong.append(f"{c}: {_dtype(ds.features, c)} (want float)")
    if wrong:
        report.add("schema", "error", ds.num_rows, "wrong column type(s): " + "; ".join(wrong))
    return not missing and not any(w.split(":")[0] in ("prompt", "chosen", "rejected", "id") for w in wrong)


def validate_pairs(
    data: Dataset | str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    template: BaseTemplate | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_truncated_fraction: float = 0.0,
    expected_round: int | None = None,
) -> DataReport:
    """Check a pairs dataset (or a dir of parquet shards); every problem found is in the returned report.

    Length checks need ``tokenizer`` (the model's: only it knows the token counts); the template check needs
    ``template``; the round check needs ``expected_round``. Skipped checks are simply not reported.
    """
    ds = load_pairs(data) if isinstance(data, (str, Path)) else data
    report = DataReport(source=str(data) if isinstance(data, (str, Path)) else "dataset", rows=ds.num_rows)
    if ds.num_rows == 0:
        report.add("schema", "error", 0, "the dataset has no rows")
        return report
    if not _check_schema(ds, report):
        return report

    ids = ds["id"]
    prompts, chosen, rejected = ds["prompt"], ds["chosen"], ds["rejected"]

    def blank(s: str | None) -> bool:
        return s is None or not s.strip()

    empty = [ids[i] for i in range(ds.num_rows) if blank(prompts[i]) or blank(chosen[i]) or blank(rejected[i])]
    if empty:
        report.add("empty", "error", len(empty), "empty prompt, chosen or rejected text; drop these rows", empty)
    identical = [ids[i] for i in range(ds.num_rows) if (chosen[i] or "").strip() == (rejected[i] or "").strip()
                 and not blank(chosen[i])]
    if identical:
        report.add("identical", "error", len(identical), "chosen == rejected: no preference signal; drop them",
                   identical)
    seen_triples = Counter(zip(prompts, chosen, rejected))
    dup_pairs = [ids[i] for i, t in enumerate(zip(prompts, chosen, rejected)) if seen_triples[t] > 1]
    if dup_pairs:
        report.add("duplicate_pair", "error", len(dup_pairs), "rows with the same (prompt, chosen, rejected); "
                   "they are over-weighted - dedupe the pairs", dup_pairs)
    id_counts = Counter(ids)
    dup_ids = sorted({i for i, n in id_counts.items() if n > 1})
    if dup_ids:
        report.add("duplicate_id", "error", sum(id_counts[i] for i in dup_ids), f"{len(dup_ids)} id(s) occur more "
                   "than once: shards were written twice or merged by hand", dup_ids)

    if template is not None:
        prefix, suffix = template_frame(template)
        off = [ids[i] for i, p in enumerate(prompts) if p and not (p.startswith(prefix) and p.endswith(suffix))]
        if off:
            report.add("template", "error", len(off), f"prompts not rendered with template {template.id!r} "
                       "(preamble + examples + answer prefix differ): pairs built with another template; rebuild "
                       "them or set model.template to the one they used", off)

    if expected_round is not None and "round" in ds.column_names:
        other = Counter(r for r in ds["round"] if r != expected_round)
        if other:
            report.add("round", "error", sum(other.values()), f"rows built in round(s) {sorted(other)} but this "
                       f"is round {expected_round}: wrong pairs dir or train.round")

    for c in REF_LOGP_COLUMNS:
        if c in ds.column_names:
            bad = [ids[i] for i, v in enumerate(ds[c]) if v is None or not math.isfinite(v) or v > 0]
            if bad:
                report.add("ref_logps", "error", len(bad), f"{c} missing, non-finite or > 0 (a summed "
                           "log-probability is <= 0); rescore or drop the columns", bad)
    if sum(c in ds.column_names for c in REF_LOGP_COLUMNS) == 1:
        report.add("ref_logps", "error", ds.num_rows, f"only one of {list(REF_LOGP_COLUMNS)} present; need both")

    if "chosen_passed" in ds.column_names and "rejected_passed" in ds.column_names:
        extra = ([is_extra(p) for p in ds["principle_id"]] if "principle_id" in ds.column_names
                 else [False] * ds.num_rows)
        not_better = [ids[i] for i, (a, b) in enumerate(zip(ds["chosen_passed"], ds["rejected_passed"]))
                      if a <= b and not extra[i]]
        if not_better:
            report.add("passed_counts", "warning", len(not_better), "chosen does not pass more constraints than "
                       "rejected", not_better)

    if tokenizer is not None and max_length is not None:
        _check_lengths(report, tokenizer, ids, prompts, chosen, rejected, max_length=max_length,
                       max_prompt_length=max_prompt_length, max_truncated_fraction=max_truncated_fraction)
    return report


def _check_lengths(
    report: DataReport,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[str],
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    max_prompt_length: int | None,
    max_truncated_fraction: float,
) -> None:
    # Counted the way TRL's DPOTrainer tokenizes: prompt alone, prompt + response + eos.
    eos = tokenizer.eos_token or ""
    p_len = [len(x) for x in tokenizer(list(prompts))["input_ids"]]
    c_len = [len(x) for x in tokenizer([p + c + eos for p, c in zip(prompts, chosen)])["input_ids"]]
    r_len = [len(x) for x in tokenizer([p + r + eos for p, r in zip(prompts, rejected)])["input_ids"]]
    n = len(ids)
    fills = [ids[i] for i in range(n) if p_len[i] >= max_length]
    if fills:
        report.add("prompt_fills_max_length", "error", len(fills), f"prompt alone has >= max_length={max_length} "
                   "tokens: TRL drops these rows (no response token left); raise train.max_length", fills)
    cut = [ids[i] for i in range(n) if p_len[i] < max_length and max(c_len[i], r_len[i]) > max_length]
    if cut:
        frac = len(cut) / n
        sev: Severity = "error" if frac > max_truncated_fraction else "warning"
        report.add("response_truncated", sev, len(cut), f"{frac:.1%} of rows lose response tokens to "
                   f"max_length={max_length} (limit {max_truncated_fraction:.1%}); raise train.max_length or "
                   "drop long pairs", cut)
    if max_prompt_length is not None:
        long_p = [ids[i] for i in range(n) if max_length > p_len[i] > max_prompt_length]
        if long_p:
            report.add("prompt_too_long", "warning", len(long_p), f"prompt longer than max_prompt_length="
                       f"{max_prompt_length} tokens (little room for the response)", long_p)
    resp = sorted(max(c, r) - p for c, r, p in zip(c_len, r_len, p_len))
    report.stats.update(
        prompt_tokens_max=max(p_len),
        response_tokens_p50=resp[len(resp) // 2],
        response_tokens_max=resp[-1],
        longest_sequence=max(max(c_len), max(r_len)),
    )


def validate_for_config(cfg: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> DataReport:
    """Run :func:`validate_pairs` with the settings of ``cfg.train`` (paths resolved from the run dir)."""
    from shared.prompting import load_template
    from trainer.paths import resolve_train_paths

    paths = resolve_train_paths(cfg)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(paths.base_model)
    t = cfg.train
    return validate_pairs(
        paths.pairs_dir, tokenizer, template=load_template(cfg.model.template), max_length=t.max_length,
        max_prompt_length=t.max_prompt_length, max_truncated_fraction=t.max_truncated_fraction,
        expected_round=t.round,
    )


def main(argv: list[str] | None = None) -> int:
    from shared.config import ConfigError, add_config_args, config_from_args
    from shared.log import setup_logging

    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        report = validate_for_config(config_from_args(args))
    except (ConfigError, PairsDataError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    report.print_table()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
