#!/usr/bin/env bash
# Pack a run's small outputs (reports, scores, per-prompt results, pair stats/cards/shards, DPO summaries and curves,
# merge reports, ledgers, server log tails) into OUT/NAME.tgz (split into 15 MiB parts NAME.tgz.aa, .ab, ... when
# larger: the device tool returns at most 8 files of 16 MiB, 2 folders deep). Model weights stay behind.
#   bash bench/collect_run.sh runs/base-gpu "$OUT"        then: cat NAME.tgz.* | tar xz
set -uo pipefail
RUN=$(cd "${1:?run dir}" && pwd); DEST=${2:?out dir}; NAME=$(basename "$RUN")
mkdir -p "$DEST"; DEST=$(cd "$DEST" && pwd)
OUT=$(mktemp -d)/$NAME; mkdir -p "$OUT"
cd "$RUN" || exit 1
find . \( -path '*/merged/*' -a ! -name merge_report.json \) -prune -o \
       \( -path '*/checkpoint-*' -o -path '*/runs/*' \) -prune -o -type f \( \
       -name 'report.md' -o -name 'report.html' -o -name '*.png' -o -name 'state.json' -o -name 'config.yaml' \
       -o -name 'scores.json' -o -name 'results.jsonl' -o -name 'stats.json' -o -name 'README.md' \
       -o -name 'audit.json' -o -name 'train_summary.json' -o -name 'metrics.jsonl' -o -name 'merge_report.json' \
       -o -name 'ledger.jsonl' -o -name '*.parquet' -o -name 'candidates.jsonl' \) -print 2>/dev/null |
  while read -r f; do mkdir -p "$OUT/$(dirname "$f")"; cp -f "$f" "$OUT/$f"; done
for log in gen_server-round-*.log; do [ -f "$log" ] && tail -n 80 "$log" > "$OUT/$log.tail"; done
tar czf "$DEST/$NAME.tgz" -C "$(dirname "$OUT")" "$NAME"
if [ "$(stat -c %s "$DEST/$NAME.tgz")" -gt $((15 << 20)) ]; then
  split -b 15M "$DEST/$NAME.tgz" "$DEST/$NAME.tgz." && rm "$DEST/$NAME.tgz"
fi
ls -la "$DEST"
