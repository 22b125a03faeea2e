#!/usr/bin/env bash
# The conversion stages and distillation on one CUDA GPU: what CI (CPU only) cannot check.
#
#   bash evals/tools/gpu_check.sh OUT_DIR TOKENIZER_DIR    # about 7 minutes on one H200 (432 s, 2026-12-04)
#
# Where the machine has torch and accelerate but not this project's other needs, carry them as
# wheels and put them first on the path (transformers 5.24, pydantic 2.14.4 with pydantic-core,
# annotated-types, typing-inspection and typing_extensions 4.16, typer 0.29.2, gguf 0.19):
#   pip install -q --no-index --no-deps --target /tmp/site WHEELS/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# 1. a tiny LLaMA (random weights) converted on the GPU twice, in two processes: the two folders
#    must hold the same tensors, to the bit;
# 2. while the fast tests of the conversion paths run with the GPU visible (pytest-xdist, 8
#    workers: every tiny-model conversion computes on the GPU, convert's --device auto taking it),
#    that model distilled under accelerate launch with FSDP2 (8-gpu-fsdp.yaml with one process),
#    the folder and then `convert --distill-steps`, then in one process (1-gpu.yaml);
# 3. evals/examples/scale.py on the GPU: 4 blocks of LLaMA-3.2-1B's shape (random weights) on both paths,
#    then all 16 blocks one block at a time.
# The command lines run with DENSETOMOE_DEBUG=1: a failure prints its whole traceback.
# TOKENIZER_DIR is any tokenizer folder (SmolLM2's, say) for the random-weight models. Each step
# writes its log to OUT_DIR (8 files at most come back) and the script goes on after a failure;
# the summary comes last.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR}
TOKENIZER=${2:?usage: gpu_check.sh OUT_DIR TOKENIZER_DIR}
WORK=${WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME SECONDS COMMAND...: run it within SECONDS, log it, record its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start)) s" >>"$OUT/summary.txt"
    echo "== $name rc=$rc $((SECONDS - start)) s"
    tail -n 20 "$OUT/$name.log"
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
cat >"$WORK/same.py" <<'PY'
"""same.py A B: every tensor in folder A equal, to the bit, to B's."""
import json, sys
from pathlib import Path
from safetensors.torch import load_file
import torch
a, b = (Path(p) for p in sys.argv[1:])
load = lambda folder: {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
ta, tb = load(a), load(b)
assert ta.keys() == tb.keys(), "different tensor names"
bits = lambda t: t.contiguous().view(-1).view(torch.uint8)
differ = [k for k in ta if ta[k].shape != tb[k].shape or not bits(ta[k]).equal(bits(tb[k]))]
print("device:", json.loads((a / "densetomoe_conversion.json").read_text()).get("device"))
print(f"{len(ta)} tensors, {len(differ)} differ: {differ[:5]}")
sys.exit(1 if differ else 0)
PY
TINY=(env DENSETOMOE_DEBUG=1 python3 -m densetomoe.cli convert "$WORK/tiny" --experts 4 --top-k 2 --calib-tokens 4096 --routing top-k --overwrite --no-progress)
step tiny-convert 60 "${TINY[@]}" --out "$WORK/tiny-moe"
step repro 60 bash -c "$(printf '%q ' "${TINY[@]}") --out $WORK/tiny-moe-2 && python3 $WORK/same.py $WORK/tiny-moe $WORK/tiny-moe-2"

# -v: each test's name and outcome as it ends, so a step cut short still says which failed
step tests 240 python3 -m pytest -v --tb=short -n 8 -m "not slow" -p no:cacheprovider --timeout 120 \
    tests/test_convert.py tests/test_decoders.py tests/test_dynamic.py tests/test_native.py tests/test_sequential.py \
    tests/test_refit.py tests/test_recovery.py tests/test_devices.py tests/test_router_calibrate.py tests/test_partition.py tests/test_teacher.py \
    tests/test_export.py tests/test_ecosystem.py &
tests=$!
FSDP=(env DENSETOMOE_DEBUG=1 accelerate launch --config_file recipes/accelerate/8-gpu-fsdp.yaml --num_processes 1 -m densetomoe.cli)
step distill-fsdp 120 bash -c "$(printf '%q ' "${FSDP[@]}") distill $WORK/tiny-moe --steps 4 --batch-size 4 --out $WORK/tiny-fsdp --overwrite --no-progress \
    && $(printf '%q ' "${FSDP[@]}") convert $WORK/tiny --experts 4 --top-k 2 --calib-tokens 4096 --distill-steps 4 --out $WORK/tiny-fsdp-convert --overwrite --no-progress"
step distill-1gpu 90 env DENSETOMOE_DEBUG=1 accelerate launch --config_file recipes/accelerate/1-gpu.yaml -m densetomoe.cli distill "$WORK/tiny-moe" --steps 4 --batch-size 4 --out "$WORK/tiny-1gpu" --overwrite --no-progress
wait $tests

step scale-4l-cuda 110 python3 evals/examples/scale.py --device cuda --layers 4 --work "$WORK/scale" --tokenizer "$TOKENIZER"
step scale-1b-cuda 150 python3 evals/examples/scale.py --device cuda --paths sequential --work "$WORK/scale" --tokenizer "$TOKENIZER"

echo "== summary"
cat "$OUT/summary.txt"
