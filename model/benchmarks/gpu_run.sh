#!/usr/bin/env bash
# One device call: accuracy checks, the benchmark, fast-path variants, sparse attention.
# Usage (repo root, on the GPU machine): OUT=dir bash model/benchmarks/gpu_run.sh [quick]
set -o pipefail
export PYTHONPATH=model/src:distill/src PYTHONUNBUFFERED=1 FASTSAM3D_PARITY_DIR=.parity
OUT=${OUT:-out}; mkdir -p "$OUT"
R=${REPEATS:-100}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cudnn', torch.backends.cudnn.version())"
  echo "== gpu tests"; timeout 120 python3 -m pytest -q -x Testing/model/test_fastpath.py Testing/model/test_cpu_fastpath.py -k "cuda or fp32 or graph" 2>&1 | tail -5
  echo "== gpu_checks"; timeout 150 python3 model/benchmarks/gpu_checks.py --parity .parity/parity.npz --out "$OUT"
  echo "== bench"; timeout 300 python3 -c "import sys; from fastsam3d.commands import bench; import argparse; p=argparse.ArgumentParser(); bench.add_parser(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" bench --device cuda --repeats "$R" --json "$OUT/bench.json"
  echo "== variants"; timeout 120 python3 model/benchmarks/fastpath_variants.py --out "$OUT"
  echo "== bench fast-compile"; timeout 150 python3 -c "import sys; from fastsam3d.commands import bench; import argparse; p=argparse.ArgumentParser(); bench.add_parser(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))" bench --device cuda --models fastsam3d --modes fast,fast-compile --no-session --batch 0 --repeats "$R" --json "$OUT/bench_compile.json"
  echo "== attention_sparsity"; timeout 150 python3 model/benchmarks/attention_sparsity.py --grids 8 16 --out "$OUT"
  if [ -n "$DISTILL_MINUTES" ]; then
    echo "== gpu_distill"; timeout $((${DISTILL_MINUTES%.*} * 60 + 90)) python3 distill/benchmarks/gpu_distill.py --out "$OUT/distill" --minutes "$DISTILL_MINUTES"
  fi
} 2>&1 | tee "$OUT/log.txt"
