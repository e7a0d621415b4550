# SuperExec image for fedcoe-flwr: runs the ServerApp (next to the SuperLink) and the ClientApps
# (one container per SuperNode) with --isolation process. The app code itself arrives with every
# run as a FAB (`flwr run`); this image only adds the app's dependencies to Flower's image.
#
#   docker compose build                                  # CPU PyTorch (small image)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124   # CUDA
#
# (docker-compose.yml builds it for every superexec-* service; the GPU services pass the CUDA index.)
# Without Docker Hub, docker/standin/Dockerfile builds an equivalent image from local wheels
# (scripts/compose_e2e.sh build).
ARG BASE_IMAGE=flwr/superexec:1.39.0
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /app
# PyTorch first, from the chosen index (CPU or CUDA wheels)
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.2" "torchvision>=0.17"

# The app's other dependencies from pyproject.toml; the image's own flwr stays (same pin, 1.39.0),
# Ray is only for simulation
COPY pyproject.toml README.md ./
COPY fedcoe_flwr ./fedcoe_flwr
COPY server_app ./server_app
COPY client_app ./client_app
RUN sed -i -e '/"flwr\[simulation\]/d' -e '/"ray>=/d' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import torch, flwr, fedcoe_flwr; print('torch', torch.__version__, 'flwr', flwr.__version__)"

# configs/ is mounted at run time (docker-compose.yml) so that editing a YAML needs no rebuild
ENV FEDCOE_PROJECT_DIR=/app
ENTRYPOINT ["flower-superexec"]
