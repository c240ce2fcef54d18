# tenfold, CPU image: `docker build -t tenfold .` then
#   docker run -p 8000:8000 -v /models:/models tenfold serve /models/base --host 0.0.0.0 --adapter-root /models/adapters
#   docker run -p 8000:8000 tenfold demo --host 0.0.0.0
FROM python:3.11-slim-bookworm

# the CPU build of torch (the PyPI default is the CUDA build)
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    VLLM_TARGET_DEVICE=cpu \
    VLLM_CPU_KVCACHE_SPACE=4 \
    VLLM_CPU_OMP_THREADS_BIND=nobind \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 tenfold

WORKDIR /opt/tenfold
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY tenfold ./tenfold
# the same install script CI runs (scripts/setup.sh), with the runtime extras only (model: the demo's model fetch)
RUN bash scripts/setup.sh /opt/venv cpu,model && chown -R tenfold /opt/tenfold

USER 1000
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tenfold"]
CMD ["demo", "--host", "0.0.0.0", "--workdir", "/home/tenfold/demo"]
