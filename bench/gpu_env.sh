# Source on the GPU machine after the wheel sets are installed (docs/benchmarks.md, "Reproducing"):
#     source bench/gpu_env.sh
# The carried wheels live in /tmp/site; flashinfer is not in the vLLM set, so vLLM must not pick its sampler.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_DEEP_GEMM=0 VLLM_NO_USAGE_STATS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
