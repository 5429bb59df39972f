# flux-nemo container: NGC PyTorch (torch, Transformer Engine, apex, DALI, NCCL, cuDNN built for the GPU)
# plus the pinned rest of pyproject.toml, plus this repository at /workspace/flux-nemo.
#
#   docker build -t flux-nemo:latest .                      (or: enroot import dockerd://flux-nemo:latest)
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<newer>-py3 -t flux-nemo:latest .
#
# Any recent NGC PyTorch tag with Python 3.11/3.12 works; newer is better (TE, NCCL, cuDNN).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/flux-nemo

# 1) Freeze the image's own CUDA stack as pip constraints. The NGC torch / TE / apex / DALI / triton / NVIDIA
#    libraries are built for this CUDA (and against this numpy); pip must never swap them for PyPI wheels.
#    pyproject pins torch==2.13.0 for the CPU venv, which is NOT what the image ships. With these constraints a
#    dependency that would need a different torch fails the build loudly instead of silently replacing torch.
RUN python -m pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|transformer[-_]engine[^=]*|apex|nvidia[-_]dali[^=]*|triton|flash[-_]attn|pytorch[-_]triton|numpy|nvidia-[^=]*)==' \
      > /tmp/ngc-constraints.txt \
 && cat /tmp/ngc-constraints.txt

# 2) The rest of pyproject.toml's dependencies, same pins (tests/launch/test_dockerfile.py checks that they agree).
#    Not installed here: torch (the image's), nvidia-dali-cuda130 (the image ships DALI for its CUDA) and the
#    `gpu` extra transformer-engine (the image's TE).
RUN python -m pip install -c /tmp/ngc-constraints.txt \
      "megatron-core==0.16.1" \
      "nemo-toolkit[core,common-only]==3.0.0" \
      "mlperf-logging==4.1.68" \
      "nemo-run==0.11.1" \
      "leptonai<0.47" \
      lightning hydra-core omegaconf pyarrow datasets webdataset diffusers transformers safetensors

# 3) This repository, editable (so `MOUNT_CURRENT_DIR=1` in slurm/run.sub can mount a checkout over it).
#    --no-deps: everything it needs is installed above; resolving pyproject's torch==2.13.0 pin here would
#    try to replace the image's torch.
COPY . /workspace/flux-nemo
RUN python -m pip install --no-deps -e /workspace/flux-nemo \
 && python -c "import flux_nemo, megatron.core, nemo, nemo_run, mlperf_logging, transformer_engine; print('ok')"

CMD ["/bin/bash"]
