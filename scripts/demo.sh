#!/usr/bin/env bash
# Set everything up and serve a demo LLaVA-1.5 with HIVTP on (retain ratio 0.5).
#
#   bash scripts/demo.sh            # tiny random-weight model, port 8000
#   MODEL=bench PORT=8001 bash scripts/demo.sh
#
# No weights can be downloaded here, so the model is a random-weight LLaVA-1.5
# in the real checkpoint layout: its answers are gibberish, its token counts
# and timings are real. Point MODEL_DIR at a real checkpoint to serve that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
size=${MODEL:-tiny}
port=${PORT:-8000}
model_dir=${MODEL_DIR:-.cache/models/$size-llava}
if [ ! -f "$model_dir/config.json" ]; then
  .venv/bin/hivtp-vllm make-model "$model_dir" --size "$size"
fi
examples=$(pwd)/examples
cat <<MSG

Serving $model_dir with HIVTP (default retain ratio 0.5) on http://127.0.0.1:$port
Once "Application startup complete" shows, try (this request asks for r = 0.25):

curl -s http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' -d '{
  "model": "$model_dir", "max_tokens": 16,
  "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "file://$examples/shapes.png"}},
    {"type": "text", "text": "What is in this picture?"}]}],
  "mm_processor_kwargs": {"hivtp_retain_ratio": 0.25}}'

usage.prompt_tokens drops by 432 (576 -> 144 visual tokens) against r = 1.0.

MSG
# CPU build: float32 (bfloat16 is far slower on AVX2-only CPUs), eager mode, and
# a fixed 2 GiB KV cache instead of a share of the machine.
exec .venv/bin/hivtp-vllm serve "$model_dir" --retain-ratio 0.5 --port "$port" \
  --dtype float32 --enforce-eager --max-model-len 4096 --kv-cache-memory-bytes 2147483648 \
  --allowed-local-media-path "$examples"
