#!/usr/bin/env bash
# The whole paper on FER2013 on one GPU, Ray-free, in one command; prints Table 1 and writes
# OUT/report.md (default OUT: paper-gpu). Options go to bench/gpu_paper.py (--help lists them):
#   bash bench/gpu_paper.sh                    # 8 minutes of training in all, FER2013 found as the GPU benches find it
#   bash bench/gpu_paper.sh --minutes 60 --data /data/fer2013 --out paper-60min
#   bash bench/gpu_paper.sh --smoke            # a CPU check of the script (a subset, tiny models)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.gpu_paper "$@"
