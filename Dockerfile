# The image the Kubernetes and EC2 cluster specs run: scheduler, GPU workers and the DaskJob's driver.
# Its dask and distributed must be the client's own versions (Dask refuses mismatched clusters in subtle ways),
# so they are build arguments without defaults; README.md shows the build command that fills them in.
# torch from PyPI on Linux is the CUDA build with its CUDA libraries bundled: the node's NVIDIA driver is all the
# host needs (the NVIDIA device plugin on Kubernetes, a GPU AMI on EC2).
FROM python:3.11-slim

ARG DASK_VERSION
ARG DISTRIBUTED_VERSION
ARG TORCH_SPEC=torch==2.13.0
RUN test -n "$DASK_VERSION" && test -n "$DISTRIBUTED_VERSION" || \
    { echo "pass --build-arg DASK_VERSION=... --build-arg DISTRIBUTED_VERSION=... (the client's versions)"; exit 1; }

# tini reaps the processes a worker's DataLoader starts; the operator's and dask-cloudprovider's commands
# (dask-worker, dask scheduler, daskgan train) run under it.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/daskgan
# torch first, on its own layer: it is the big one, and the rest must not resolve another build of it
RUN pip install --no-cache-dir "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY daskgan ./daskgan
RUN pip install --no-cache-dir . "dask==$DASK_VERSION" "distributed==$DISTRIBUTED_VERSION" && \
    python -c "import dask, distributed, daskgan.training.loop; \
assert dask.__version__ == '$DASK_VERSION' and distributed.__version__ == '$DISTRIBUTED_VERSION'"

# No credentials in the image: workers get them from a Kubernetes Secret, an IRSA role or the instance profile.
ENV PYTHONUNBUFFERED=1
# tini reaps orphans and passes SIGTERM to its child alone (no -g): an evicted worker pod's `dask worker` (the nanny)
# holds its worker process until the run's checkpoint is durable (daskgan.preemption); a SIGTERM to the whole
# process group would end the worker process at once.
ENTRYPOINT ["tini", "--"]
