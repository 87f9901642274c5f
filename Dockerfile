# scan-pipe for GPU hosts: `docker build -t scan-pipe .`, then see README.md ("Docker").
#
# Base: NVIDIA's CUDA runtime image for the CUDA release torch 2.11.0's PyPI wheels are built for (13.0), so
# the NVIDIA Container Toolkit (`docker run --gpus all`) finds its labels and a driver-compatible runtime.
# torch's wheels still bring their own cuDNN/cuBLAS/NCCL (nvidia-* wheels), which are the ones it loads.
# Override CUDA_IMAGE to pin a newer patch release of the same line.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3 (3.12 on Ubuntu 24.04) in a virtual environment (the system one is externally managed); git: DVC
# needs it for `dvc repro` bookkeeping and `dvc exp`; libglib2.0-0: OpenCV's runtime dependency. Ubuntu
# package versions are not pinned: security updates replace them, and pinned versions would break the build
# instead of taking the fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git python3 python3-venv libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && git config --system --add safe.directory /workspace \
    && git config --system user.name scan-pipe \
    && git config --system user.email scan-pipe@localhost

WORKDIR /workspace

# Install the package in editable mode: a checkout mounted over /workspace then runs its own code (the code
# DVC hashes for its stages), with the dependencies installed here.
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY extractors/ extractors/
COPY stages/ stages/
RUN pip install -e . && scan-pipe --help > /dev/null

# The pipeline definition, so the image alone can `dvc repro` (a git repository is made for DVC's bookkeeping).
COPY dvc.yaml params.yaml .dvcignore ./
COPY .dvc/config .dvc/config
COPY .dvc/.gitignore .dvc/.gitignore
RUN git init -q && git add -A && git commit -q -m "scan-pipe image" && dvc status > /dev/null

# /datasets: images + Karpathy split files (read-only is fine); /weights: the published detector weights.
# Pipeline outputs go to /workspace/data, /workspace/results and /workspace/reports: mount a checkout over
# /workspace (or volumes over those folders) to keep them.
VOLUME ["/datasets", "/weights"]

ENTRYPOINT ["scan-pipe"]
CMD ["--help"]
