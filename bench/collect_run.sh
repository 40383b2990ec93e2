#!/usr/bin/env bash
# Copy a run's small outputs (reports, scores, per-prompt results, pair stats/cards/shards, DPO summaries and curves,
# merge reports, ledgers, server log tails) out of RUN into OUT, keeping the layout; model weights stay behind.
#   bash bench/collect_run.sh runs/base-gpu /tmp/out/base-gpu
set -uo pipefail
RUN=${1:?run dir}; OUT=${2:?out dir}
mkdir -p "$OUT"
cd "$RUN" || exit 1
find . \( -path '*/merged/*' -a ! -name merge_report.json \) -prune -o \
       \( -path '*/checkpoint-*' -o -path '*/runs/*' \) -prune -o -type f \( \
       -name 'report.md' -o -name 'report.html' -o -name '*.png' -o -name 'state.json' -o -name 'config.yaml' \
       -o -name 'scores.json' -o -name 'results.jsonl' -o -name 'stats.json' -o -name 'README.md' \
       -o -name 'audit.json' -o -name 'train_summary.json' -o -name 'metrics.jsonl' -o -name 'merge_report.json' \
       -o -name 'ledger.jsonl' -o -name '*.parquet' -o -name 'candidates.jsonl' \) -print 2>/dev/null |
  while read -r f; do mkdir -p "$OUT/$(dirname "$f")"; cp -f "$f" "$OUT/$f"; done
for log in gen_server-round-*.log; do [ -f "$log" ] && tail -n 80 "$log" > "$OUT/$log.tail"; done
du -sh "$OUT" | cut -f1
