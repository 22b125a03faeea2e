#!/usr/bin/env bash
# The conversion stages and distillation on one CUDA GPU: what CI (CPU only) cannot check.
#
#   bash evals/gpu_check.sh OUT_DIR TOKENIZER_DIR    # about 10 minutes on one H200
#
# 1. a tiny LLaMA (random weights) converted on the GPU, then distilled under accelerate launch: one
#    process (recipes/accelerate/1-gpu.yaml) and FSDP2 (8-gpu-fsdp.yaml with one process);
# 2. the fast tests of the conversion paths with the GPU visible: every tiny-model conversion then
#    computes on it (convert's --device auto takes the accelerator);
# 3. evals/scale.py on 4 blocks of LLaMA-3.2-1B's shape (random weights), both paths on the GPU,
#    then one block at a time on the same machine's CPU cores, for comparison.
# TOKENIZER_DIR is any tokenizer folder (SmolLM2's, say) for the random-weight models. Each step
# writes its log to OUT_DIR and the script goes on after a failure; the summary comes last.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR}
TOKENIZER=${2:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR}
WORK=${WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=()
step() {  # step NAME SECONDS COMMAND...: run it within SECONDS, log it, record its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $((SECONDS - start)) s")
    echo "== $name rc=$rc $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"

python3 - "$WORK/tiny" "$TOKENIZER" <<'PY'
import sys, torch, transformers
folder, tokenizer = sys.argv[1], sys.argv[2]
tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(folder)
tok.save_pretrained(folder)
PY
step tiny-convert 45 python3 -m densetomoe.cli convert "$WORK/tiny" --experts 4 --top-k 2 --calib-tokens 4096 --routing top-k --out "$WORK/tiny-moe" --overwrite --no-progress
step distill-1gpu 75 accelerate launch --config_file recipes/accelerate/1-gpu.yaml -m densetomoe.cli distill "$WORK/tiny-moe" --steps 4 --batch-size 4 --out "$WORK/tiny-1gpu" --overwrite --no-progress
step distill-fsdp 75 accelerate launch --config_file recipes/accelerate/8-gpu-fsdp.yaml --num_processes 1 -m densetomoe.cli distill "$WORK/tiny-moe" --steps 4 --batch-size 4 --out "$WORK/tiny-fsdp" --overwrite --no-progress

# -v: each test's name and outcome as it ends, so a step cut short still says which failed
step tests 150 python3 -m pytest -v --tb=line -m "not slow" -p no:cacheprovider --timeout 60 --continue-on-collection-errors \
    tests/test_convert.py tests/test_decoders.py tests/test_dynamic.py tests/test_native.py tests/test_sequential.py tests/test_refit.py tests/test_recovery.py
step scale-4l-cuda 150 python3 evals/scale.py --device cuda --layers 4 --work "$WORK/scale" --tokenizer "$TOKENIZER"
step scale-4l-cpu 150 python3 evals/scale.py --device cpu --layers 4 --paths sequential --work "$WORK/scale" --tokenizer "$TOKENIZER"

echo "== summary"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
