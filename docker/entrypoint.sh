#!/usr/bin/env bash
# `docker run kiln:0.1.0 pretrain --recipe llama3_8b ...` runs `kiln pretrain ...`;
# any other executable (python, bash, torchrun) runs as given, for NeMo-Run's DockerExecutor.
set -euo pipefail
if [ "$#" -gt 0 ] && command -v "$1" >/dev/null 2>&1 && [ "$1" != "kiln" ]; then
  exec "$@"
fi
[ "${1:-}" = "kiln" ] && shift
exec kiln "$@"
