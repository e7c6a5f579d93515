#!/usr/bin/env bash
# The GPU path, run once end to end on one CUDA GPU within 10 minutes (issue 12):
#   1. env         torch, the GPU, nvidia-smi
#   2. tests       tests/test_model.py with every model and tensor on the GPU (NAS_TEST_DEVICE)
#   3. study       one trial per variant of studies/resformer_scaling_gpu.yaml at its smallest
#                  size (small: 8 layers, d 192, seq 1024, GPT-2 vocabulary, batch 32,
#                  bf16-mixed), 300 steps each, on the builtin corpus
#   4. export      the best of those trials as a run config (nas export --best 1)
#   5. train       nas train of that config on the GPU, through torch.compile (train.compile)
#   6. throughput  tokens/s and MFU, eager against compiled, bf16-mixed, at the study's smallest
#                  and largest sizes (benchmarks/gpu_throughput.py)
# Each stage runs under a timeout (its own limit, cut to what is left of the whole budget), and
# a failed stage does not stop the later ones. Written under $OUT (default runs/gpu_smoke):
# summary.md (every table and each stage's result and seconds, also printed at the end) and one
# log per stage; seven files in all. The study's storage, the exported config and the trained
# run go to $GPU_SMOKE_WORK (default ${TMPDIR:-/tmp}/gpu_smoke_work, emptied first if this
# script made it).
# Exits 0 only if every stage passed.
#
#   bash benchmarks/gpu_smoke.sh                                  # on a GPU machine
#   GPU_SMOKE_DEVICE=cpu bash benchmarks/gpu_smoke.sh             # the same stages, tiny, on
#                                                     # one CPU thread (3.5-5 min on 2 busy cores)
# Settings (environment): GPU_SMOKE_DEVICE (cuda | cpu), GPU_SMOKE_BUDGET (seconds for all
# stages; default 540 on cuda, 480 on cpu), PEAK_TFLOPS (the GPU's dense bf16 peak for MFU;
# default 989, an H100 or H200 SXM), OUT, GPU_SMOKE_WORK, NAS_PYTHON.
#
# What it needs, and installs nothing from the network: a Python with this project's
# dependencies and a CUDA build of torch, the first found of
#   - $NAS_PYTHON (the working tree is put on its PYTHONPATH);
#   - .venv/bin/python (`make setup TORCH_SPEC=torch`: a CUDA build of torch from PyPI);
#   - python3 with the wheels in .whl/ installed beside it: for a GPU machine that reaches no
#     package index but whose python3 holds torch, lightning and most of the rest (this
#     workplace's H200 image): `make gpu-wheels` here fetches the missing ones (22 MB), and
#     they travel with the working tree (.whl/ is git-ignored);
#   - else it runs `make setup TORCH_SPEC=torch`, which needs PyPI.
# No data: the builtin corpus (Python's own sources, as bytes) stands in for the study's shards.

set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_SMOKE_DEVICE:-cuda}
OUT=${OUT:-runs/gpu_smoke}
WORK=${GPU_SMOKE_WORK:-${TMPDIR:-/tmp}/gpu_smoke_work}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Emptied only if this script made it (its marker file), never a folder of someone else's.
if [[ -d $WORK && -n $(ls -A "$WORK") && ! -e $WORK/.gpu_smoke_work ]]; then
  echo "GPU_SMOKE_WORK=$WORK: not empty and not made by this script; give another" >&2
  exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK" && touch "$WORK/.gpu_smoke_work"
STUDY_DB="sqlite:///$WORK/study.db"

# The study's runs as the GPU study trains them, fixed to one size, learning rate and seed, a
# few hundred steps each (overrides of its space, as `nas search --set` reads them); on the
# CPU, tiny runs of the same spec. Stage limits in seconds.
STUDY_SETS=(model.preset=small train.lr=1.5e-3 train.seed=0 train.tokens_per_param=null
            train.steps=300 train.eval_every=100)
SEARCH_ARGS=()
case $DEVICE in
  cuda)
    BUDGET=${GPU_SMOKE_BUDGET:-540}
    TRAIN_COMPILE=true
    THROUGHPUT_ARGS=(--device cuda --peak-tflops "$PEAK_TFLOPS")
    declare -A LIMIT=([env]=60 [tests]=120 [study]=210 [export]=60 [train]=150
                      [throughput]=240)
    ;;
  cpu)
    BUDGET=${GPU_SMOKE_BUDGET:-480}
    # One thread (shared machines; oversubscribed OpenMP threads slow CPU training by an
    # order of magnitude); torch.compile is measured by the throughput stage, so the tiny
    # nas train skips its minute of compiling.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TRAIN_COMPILE=false
    STUDY_SETS+=(model.preset=pico model.seq_len=32 model.vocab_size=256 train.batch_size=4
                 train.eval_batches=2 train.steps=20 train.eval_every=10)
    SEARCH_ARGS=(--threads "$OMP_NUM_THREADS")
    THROUGHPUT_ARGS=(--device cpu --sizes pico --seq-len 32 --vocab-size 256 --batch-size 4
                     --steps 4 --warmup 1 --threads "$OMP_NUM_THREADS")
    declare -A LIMIT=([env]=60 [tests]=150 [study]=180 [export]=60 [train]=90
                      [throughput]=240)
    ;;
  *) echo "GPU_SMOKE_DEVICE: cuda or cpu, not '$DEVICE'" >&2; exit 2 ;;
esac

if [[ -n ${NAS_PYTHON:-} ]]; then
  PY=$NAS_PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  PY=python3
else
  make setup TORCH_SPEC=torch
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DEADLINE=$((SECONDS + BUDGET))
STAGES="$WORK/stages.md"
printf '| stage | result | seconds | limit s |\n|---|---|---:|---:|\n' >"$STAGES"
FAILED=0

# stage NAME COMMAND...: COMMAND with its output in $OUT/NAME.log, under the stage's limit cut
# to what is left of the budget; its result and seconds go to the summary.
stage() {
  local name=$1; shift
  local left=$((DEADLINE - SECONDS)) limit=${LIMIT[$name]} start=$SECONDS rc=0
  if ((left < 15)); then
    printf '| %s | skipped: the budget of %d s is spent | 0 | %d |\n' "$name" "$BUDGET" \
      "$limit" >>"$STAGES"
    FAILED=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most $limit s)"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local result=ok
  if ((rc == 124 || rc == 137)); then
    result="timed out"
  elif ((rc != 0)); then
    result="failed (exit $rc)"
  fi
  if [[ $result != ok ]]; then
    FAILED=1
    tail -n 20 "$OUT/$name.log"
  fi
  printf '| %s | %s | %d | %d |\n' "$name" "$result" $((SECONDS - start)) "$limit" >>"$STAGES"
}

stage env "$PY" -c "
import sys, torch
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}')
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'torch sees no CUDA GPU (a CPU build of torch?)'
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
import nas.cli  # the project and its dependencies import
"
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$OUT/env.log" 2>&1 || true; fi

# The GPU study with STUDY_SETS written into its space (in the spec, not as `--set`: nas export
# takes no --set and refuses a spec that differs from the stored study), the builtin corpus,
# and one trial per variant: without its learning-rate protocol (lr_sweep first_seed needs a
# grid of rates and seeds, 4 runs a variant at least).
if ! "$PY" - "$WORK/study.yaml" "${STUDY_SETS[@]}" <<'EOF'
import sys
from pathlib import Path

import yaml

from nas import overrides

out, sets = sys.argv[1], sys.argv[2:]
spec = yaml.safe_load(Path("studies/resformer_scaling_gpu.yaml").read_text())
space = yaml.safe_load(Path("studies", spec["space"]).read_text())
spec.update(name="gpu_smoke", space=overrides.apply(space, overrides.parse_all(sets)),
            n_trials=len(space["variants"]))
spec["base"]["data"]["source"] = "builtin"
spec.pop("lr_sweep")
Path(out).write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
then
  FAILED=1
fi

stage tests env NAS_TEST_DEVICE="$DEVICE" "$PY" -m pytest tests/test_model.py -n 0 -q \
  -p no:cacheprovider
stage study "$PY" -m nas search "$WORK/study.yaml" --storage "$STUDY_DB" --no-progress \
  "${SEARCH_ARGS[@]}"
stage export "$PY" -m nas export "$WORK/study.yaml" --storage "$STUDY_DB" --best 1 \
  --out "$WORK/exported"
EXPORTED=$(compgen -G "$WORK/exported/gpu_smoke-trial-*.yaml" | head -n 1 || true)
stage train "$PY" -m nas train "${EXPORTED:-"(no exported config)"}" --out "$WORK/train" \
  --set train.compile="$TRAIN_COMPILE"
stage throughput "$PY" benchmarks/gpu_throughput.py "${THROUGHPUT_ARGS[@]}"
printf '| all stages | %s | %d | %d |\n' "$( ((FAILED)) && echo "not all ok" || echo ok)" \
  $((SECONDS - DEADLINE + BUDGET)) "$BUDGET" >>"$STAGES"

# The summary: the stages, each study trial and the nas train run (MFU as
# benchmarks/gpu_throughput.py counts it), and the throughput table.
"$PY" - "$DEVICE" "$PEAK_TFLOPS" "$STUDY_DB" "$WORK" "$STAGES" "$OUT" >"$OUT/summary.md" <<'EOF'
import json
import sys
from pathlib import Path

import optuna

from nas.search.storage import make_storage
from nas.search.trials import records

device, peak, db, work, stages, out = sys.argv[1:]
work, out = Path(work), Path(out)


def mfu(n_params: float | None, tokens_per_s: float | None) -> str:
    if device == "cpu" or not n_params or not tokens_per_s:
        return "n/a"
    return f"{100 * 6 * n_params * tokens_per_s / (float(peak) * 1e12):.1f}%"


def number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


print(f"# benchmarks/gpu_smoke.sh on {device}\n")
print((out / "env.log").read_text().strip().splitlines()[0] + "\n")
print(Path(stages).read_text())
print("## One trial per variant (nas search)\n")
print("| trial | variant | state | val_loss | steps | tokens/s | MFU | train s |")
print("|---:|---|---|---:|---:|---:|---:|---:|")
try:
    study = optuna.load_study(study_name="gpu_smoke", storage=make_storage(db))
    trials = records(study.get_trials(deepcopy=False))
except Exception as exc:  # no study: the study stage failed before creating it
    print(f"| | no study: {exc} | | | | | | |")
    trials = []
for t in trials:
    print(f"| {t.number} | {t.arm_name} | {t.state.name} | {number(t.val_loss, '.4f')} "
          f"| {number(t.steps_trained, 'd')} | {number(t.tokens_per_s, ',.0f')} "
          f"| {mfu(t.n_params_non_embedding, t.tokens_per_s)} "
          f"| {number(t.train_seconds, '.1f')} |")
print("\n## nas train of the exported best trial\n")
metrics_file = work / "train" / "metrics.json"
if metrics_file.exists():
    m = json.loads(metrics_file.read_text())
    print("| config | compiled | val_loss | steps | tokens/s | MFU | train s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| {m['mode']}, {m['n_params_non_embedding']:,} non-embedding params "
          f"| {m['compiled']} | {m['val_loss']:.4f} | {m['steps']} | {m['tokens_per_s']:,.0f} "
          f"| {mfu(m['n_params_non_embedding'], m['tokens_per_s'])} "
          f"| {m['train_seconds']:.1f} |")
else:
    print("no metrics.json: see train.log")
print("\n## Throughput and MFU, eager and compiled (benchmarks/gpu_throughput.py)\n")
log = (out / "throughput.log").read_text().splitlines() if (out / "throughput.log").exists() else []
table = [line for line in log if line.startswith("|")]
print("\n".join(table + log[-1:]) if table else "no table: see throughput.log")
EOF
cat "$OUT/summary.md"
exit "$FAILED"
