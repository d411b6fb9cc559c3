#!/usr/bin/env bash
# The whole multi-GPU matrix of issue 15 in one device call on an nvidia-h200-x8 (or -x4/-x2:
# cases needing more GPUs than visible are skipped): tensor parallel 2/4/8 through torchrun and
# transformers' tp_plan="auto", pipeline parallel 2/4 through a device_map of whole layers as
# `vramplan plan` splits stages, one `vramplan validate` per case, every rank's row appended to
# $OUT/h200-multigpu.jsonl (allocated and reserved peaks, NVML's per-process figure; NVML minus
# reserved is the context's and NCCL's share).
#
#   scripts/device-run.sh scripts/multigpu-on-device.sh          # carry .whl
#
# NVLink multicast stays off in every process started here (the device notes: a program that
# uses it can take the host's GPUs out of service).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:?run this on the device machine, where OUT is set}/h200-multigpu.jsonl
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# model layers precision batch prompt new_tokens layout size
# Qwen2.5-7B at tp 4 holds one of its 4 KV heads per rank, the most transformers' tp_plan splits;
# fewer KV heads than ranks (replication) is vLLM's layout, which cannot run on the lent machines.
cases="
llama-3.1-8b - bf16 8 2048 16 tp 2
llama-3.1-8b - bf16 8 2048 16 tp 4
llama-3.1-8b - bf16 8 2048 16 tp 8
llama-3.1-8b - bf16 8 2048 16 pp 2
llama-3.1-8b - bf16 8 2048 16 pp 4
qwen2.5-7b - bf16 8 2048 16 tp 4
qwen2.5-7b - bf16 8 2048 16 tp 2
qwen2.5-7b - bf16 8 2048 16 pp 4
qwen3-30b-a3b 12 bf16 8 1024 16 tp 2
qwen3-30b-a3b 12 bf16 8 1024 16 tp 4
qwen3-30b-a3b 12 bf16 8 1024 16 pp 2
deepseek-v2-lite - bf16 4 1024 16 tp 2
deepseek-v2-lite - bf16 4 1024 16 pp 2
gemma-2-9b-it - bf16 4 2048 16 tp 2
gemma-2-9b-it - bf16 4 2048 16 tp 4
gemma-2-9b-it - bf16 4 2048 16 pp 2
llama-3.1-70b - bf16 4 2048 16 tp 4
llama-3.1-70b - bf16 4 2048 16 tp 8
llama-3.1-70b - bf16 4 2048 16 pp 4
mixtral-8x7b-v0.1 8 bf16 4 1024 16 tp 2
mixtral-8x7b-v0.1 8 bf16 4 1024 16 pp 2
"
echo "$cases" | while read -r model layers precision batch prompt new layout size; do
  [ -n "$model" ] || continue
  if [ "$size" -gt "$gpus" ]; then echo "skip $model $layout $size: $gpus GPUs"; continue; fi
  extra=(); [ "$layers" = "-" ] || extra=(--layers "$layers")
  timeout 300 python3 -m vramplan.cli validate "$model" "${extra[@]}" --precision "$precision" --batch "$batch" \
    --prompt-len "$prompt" --new-tokens "$new" --"$layout" "$size" --out "$out" \
    || echo "case failed: $model $layout $size"
done
wc -l "$out"
