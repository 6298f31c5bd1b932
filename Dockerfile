# hivtp-vllm: vLLM's OpenAI server with HIVTP visual token pruning.
#
#   docker build -t hivtp-vllm .
#   docker run --gpus all -p 8000:8000 -e HIVTP_RETAIN_RATIO=0.25 \
#     -v hf-cache:/home/vllm/.cache/huggingface hivtp-vllm [more vLLM options]
#
# The base is vLLM's own server image at a release the plugin supports (it
# refuses to load on another): 0.33.0 by default, or 0.32.0 with
# `docker build --build-arg VLLM_VERSION=0.32.0 .`. For a reproducible build
# pin the digest too: `docker buildx imagetools inspect
# vllm/vllm-openai:v0.33.0` prints it, then write
# FROM vllm/vllm-openai:v${VLLM_VERSION}@sha256:<digest>.
ARG VLLM_VERSION=0.33.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# The base has vLLM and everything the plugin imports (torch, transformers,
# fastapi, pydantic, prometheus-client, safetensors, pillow): install the
# plugin alone, then fail the build here rather than at start-up if the vLLM
# in the image is not a supported one.
WORKDIR /opt/hivtp-vllm
COPY pyproject.toml README.md ./
COPY hivtp_vllm ./hivtp_vllm
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "from hivtp_vllm.vllm_compat import check_vllm_version as c; c()"

# vLLM's image runs as root; serving needs no privilege. The home holds the
# Hugging Face cache (mount a volume there to keep weights across restarts)
# and vLLM's own cache.
RUN useradd --create-home --home-dir /home/vllm --uid 10001 --shell /bin/bash vllm \
    && mkdir -p /home/vllm/.cache/huggingface \
    && chown -R vllm:vllm /home/vllm
ENV HOME=/home/vllm \
    HF_HOME=/home/vllm/.cache/huggingface \
    MODEL=llava-hf/llava-1.5-7b-hf \
    HIVTP_RETAIN_RATIO=0.5 \
    PORT=8000
USER 10001
WORKDIR /home/vllm
EXPOSE 8000

# Start-up downloads the weights on first run: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=8)"]

# The README's command; arguments after the image name are vLLM options,
# e.g. `docker run ... hivtp-vllm --tensor-parallel-size 2`.
ENTRYPOINT ["/bin/sh", "-c", "exec hivtp-vllm serve \"$MODEL\" --retain-ratio \"$HIVTP_RETAIN_RATIO\" --port \"$PORT\" \"$@\"", "hivtp-vllm"]
CMD []
