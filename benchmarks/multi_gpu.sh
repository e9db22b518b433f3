#!/usr/bin/env bash
# Runs on a machine of 2 GPUs: model parallel with NCCL, end to end.
#
#   bash benchmarks/multi_gpu.sh tests       # every multi-process test, on GPUs (NCCL)
#   bash benchmarks/multi_gpu.sh bench       # 13B decode table, MP=2 vs MP=1 (benchmarks/decode.py under torchrun)
#   bash benchmarks/multi_gpu.sh examples    # 13B (2 shards) and 70B-width (8 shards) through the examples
#
# Logs go to $OUT (default /tmp/multi-gpu). Random checkpoints are written to $CKPTS
# (default /tmp/llama-mp): 13B in 2 shards (26 GB) and a 70B-width model of 8 of its 80
# layers in 8 shards (15 GB). The examples run greedy in float32 on 2 GPUs and on 1 GPU
# (resharded at load time); their outputs must be the same.
set -u
OUT=${OUT:-/tmp/multi-gpu}
CKPTS=${CKPTS:-/tmp/llama-mp}
TOK=tests/fixtures/tokenizer.model
mkdir -p "$OUT" "$CKPTS"
# NVLink multicast stays off (shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

run() { python3 -m torch.distributed.run --nproc_per_node "$1" --master_port $((29500 + RANDOM % 1000)) "${@:2}"; }

same_output() {  # name, then the two files: generations must match (timings and warnings aside)
  if diff <(grep -v -e '^Loaded in' -e 'Warning' "$2") <(grep -v -e '^Loaded in' -e 'Warning' "$3") >/dev/null; then
    echo "$1: MP=2 and MP=1 outputs identical ($(grep -c '^>' "$2") generations)"
  else
    echo "$1: OUTPUTS DIFFER"; diff "$2" "$3" | head -20
  fi
}

examples() {
  local name=$1 dir=$2
  for n in 2 1; do
    run "$n" example_text_completion.py --ckpt_dir "$dir" --tokenizer_path $TOK --temperature 0 --max_gen_len 24 \
      --dtype float32 --compile False >"$OUT/$name-text-mp$n.txt" 2>"$OUT/$name-text-mp$n.err" || tail -5 "$OUT/$name-text-mp$n.err"
  done
  same_output "$name text" "$OUT/$name-text-mp2.txt" "$OUT/$name-text-mp1.txt"
}

case "${1:-}" in
  tests)
    LLAMA_TEST_MP_DEVICE=cuda python3 -m pytest -q -rfE -m multiproc tests 2>&1 | tail -15
    ;;
  bench)
    run 2 benchmarks/decode.py --model 13B --formats bf16,int8,int4 --paths reference --json "$OUT/mp2.json" 2>"$OUT/bench-mp2.err" | grep -v Warning
    run 1 benchmarks/decode.py --model 13B --formats bf16,int8,int4 --paths reference --json "$OUT/mp1.json" 2>"$OUT/bench-mp1.err" | grep -v Warning
    ;;
  examples)
    [ -f "$CKPTS/13B/params.json" ] || python3 -m llama.tools.random_checkpoint "$CKPTS/13B" --dim 5120 --n_layers 40 \
      --n_heads 40 --multiple_of 256 --shards 2 --device cuda
    examples 13B "$CKPTS/13B"
    run 2 example_chat_completion.py --ckpt_dir "$CKPTS/13B" --tokenizer_path $TOK --temperature 0 --max_gen_len 24 \
      --dtype float32 --compile False >"$OUT/13B-chat-mp2.txt" 2>/dev/null
    run 1 example_chat_completion.py --ckpt_dir "$CKPTS/13B" --tokenizer_path $TOK --temperature 0 --max_gen_len 24 \
      --dtype float32 --compile False >"$OUT/13B-chat-mp1.txt" 2>/dev/null
    same_output "13B chat" "$OUT/13B-chat-mp2.txt" "$OUT/13B-chat-mp1.txt"
    [ -f "$CKPTS/70B-8L/params.json" ] || python3 -m llama.tools.random_checkpoint "$CKPTS/70B-8L" --dim 8192 \
      --n_layers 8 --n_heads 64 --n_kv_heads 8 --multiple_of 4096 --ffn_dim_multiplier 1.3 --shards 8 --device cuda
    examples 70B-8L "$CKPTS/70B-8L"
    ;;
  *)
    echo "usage: bash benchmarks/multi_gpu.sh tests|bench|examples" >&2; exit 2 ;;
esac
