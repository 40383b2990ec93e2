#!/usr/bin/env bash
# Run a pipeline config on the GPU machine across several device calls (each call at most 10 minutes; the machine
# is given back 30 s after a call ends, and everything on it with it):
#   bash bench/gpu_watch.sh CONFIG SECONDS [overrides...]
# Starts `python3 -m pipeline run --config CONFIG run.root=/tmp/runs overrides...` detached (setsid) unless it is
# already running or finished, then every 30 s packs the run's small outputs into $OUT (bench/collect_run.sh) with
# the last lines of its log, for SECONDS or until the run stops. Call it again in the next device call to keep
# watching (the detached run goes on while a call is in flight). Needs `source bench/gpu_env.sh` done first.
# The packs keep each round's adapter, so a run can go on in a later session: unpack the last NAME.tgz into an
# ignored folder, carry it, and set RESUME_FROM=that/NAME: it is copied to /tmp/runs/NAME before the run starts,
# and `pipeline run` merges the finished rounds again from their adapters.
set -uo pipefail
CONFIG=${1:?config}; SECONDS_LEFT=${2:?seconds}; shift 2
NAME=$(python3 -c "import sys; sys.path.insert(0, '.'); from shared.config import load_config; \
print(load_config(sys.argv[1], sys.argv[2:]).run.name)" "$CONFIG" "$@")
RUN=/tmp/runs/$NAME; LOG=/tmp/runs/$NAME.log
mkdir -p /tmp/runs "${OUT:?OUT not set}"
if [ -n "${RESUME_FROM:-}" ] && [ ! -d "$RUN" ]; then echo "resuming from $RESUME_FROM"; cp -r "$RESUME_FROM" "$RUN"; fi
stopped() { [ -f "$RUN/state.json" ] && python3 -c "import json,sys; sys.exit(0 if json.load(open('$RUN/state.json')).get('stopped') else 1)"; }
if ! pgrep -f "pipeline run --config $CONFIG" >/dev/null && ! stopped; then
  echo "starting $NAME"
  setsid nohup python3 -m pipeline run --config "$CONFIG" run.root=/tmp/runs "$@" >>"$LOG" 2>&1 < /dev/null &
fi
end=$(( $(date +%s) + SECONDS_LEFT ))
while :; do
  sleep 30
  [ -d "$RUN" ] && bash bench/collect_run.sh "$RUN" "$OUT" --adapters >/dev/null 2>&1
  tail -n 60 "$LOG" > "$OUT/pipeline.log.tail" 2>/dev/null
  if stopped; then echo "run stopped"; break; fi
  [ "$(date +%s)" -ge "$end" ] && break
done
tail -n 25 "$LOG"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
