#!/usr/bin/env bash
# The pure-Python packages that the offline GPU test host lacks, copied from this project's venv into one folder
# that travels with the working tree (docs/PERFORMANCE.md, "Running on the offline GPU host").
# Usage: bench/host_extra.sh [OUT]   (default .gpu/extra, git-ignored); on the host put OUT on PYTHONPATH after
# Transformer Engine's /tmp/site: PYTHONPATH=/tmp/site:$PWD/.gpu/extra:$PWD
# lightning comes along too: the host's lightning 2.6 lacks the NeptuneLogger that NeMo 3.0's exp_manager imports.
set -euo pipefail
out=${1:-.gpu/extra}
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
packages=(hydra omegaconf antlr4 mlperf_logging nemo nv_one_logger wrapt braceexpand webdataset strenum overrides
          toml lightning lightning_utilities)
rm -rf "$out" && mkdir -p "$out"
for p in "${packages[@]}"; do
  [ -d "$site/$p" ] || { echo "$p: not in $site (run make install first)" >&2; exit 1; }
  cp -r "$site/$p" "$out/"
done
# compiled extensions are built for this Python; wrapt falls back to pure Python without its own
find "$out" -name "__pycache__" -type d -prune -exec rm -rf {} +
find "$out" -name "*.so" -delete
du -sh "$out"
