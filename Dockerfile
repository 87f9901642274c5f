# scan-pipe for GPU hosts: `docker build -t scan-pipe .`, then see docs/PIPELINE.md ("Docker").
#
# Base: a slim Python image rather than nvidia/cuda. torch 2.11.0's PyPI wheel (and torchvision's) bring their
# own CUDA runtime, cuDNN, cuBLAS and NCCL as nvidia-* wheels, so a CUDA base image would only add a second,
# unused copy of the same libraries (several GB). The host needs an NVIDIA driver new enough for that CUDA
# release and the NVIDIA Container Toolkit (`docker run --gpus all`); nothing CUDA is needed in the image.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1

# git: DVC needs it for `dvc repro` bookkeeping and `dvc exp`. libglib2.0-0: OpenCV's runtime dependency.
# Debian package versions are not pinned: bookworm-security replaces them, and pinned versions would break
# the build instead of taking the security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
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
