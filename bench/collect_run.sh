#!/usr/bin/env bash
# Pack a run's small outputs (reports, scores, per-prompt results, pair stats/cards/shards, DPO summaries and curves,
# merge reports, ledgers, server log excerpts) into OUT/NAME.tgz (split into 15 MiB parts NAME.tgz.aa, .ab, ... when
# larger: the device tool returns at most 8 files of 16 MiB, 2 folders deep). Model weights stay behind.
#   bash bench/collect_run.sh runs/base-gpu "$OUT" [--adapters]     then: cat NAME.tgz.* | tar xz
# --adapters also keeps each round's LoRA adapter (round-K/adapter, no checkpoints; ~30 MB a round for
# gemma3-270m at r=32): with them the run continues on another machine, where `pipeline run` merges each round
# again from its adapter before serving it (a merged model is derived data).
set -uo pipefail
RUN=$(cd "${1:?run dir}" && pwd); DEST=${2:?out dir}; NAME=$(basename "$RUN"); ADAPTERS=${3:-}
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
if [ "$ADAPTERS" = "--adapters" ]; then
  for a in round-*/adapter; do
    [ -d "$a" ] || continue
    mkdir -p "$OUT/$a"; find "$a" -maxdepth 1 -type f -exec cp -f {} "$OUT/$a/" \;
  done
fi
# each server log's start (where its start-up time goes) and end (how it stopped)
for log in gen_server-round-*.log; do
  [ -f "$log" ] && { grep -v '"POST /v1/' "$log" | head -n 120; echo "[...]"; tail -n 40 "$log"; } > "$OUT/$log.excerpt"
done
tar czf "$DEST/$NAME.tgz" -C "$(dirname "$OUT")" "$NAME"
if [ "$(stat -c %s "$DEST/$NAME.tgz")" -gt $((15 << 20)) ]; then
  split -b 15M "$DEST/$NAME.tgz" "$DEST/$NAME.tgz." && rm "$DEST/$NAME.tgz"
fi
ls -la "$DEST"
