# Sourced by scripts/setup and scripts/demo: the virtual environment .venv, created only where it is missing (a
# developer's own environment is never deleted), with the same CPU torch pinned first so that pip does not pull a
# CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
