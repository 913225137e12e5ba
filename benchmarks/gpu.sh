#!/usr/bin/env bash
# The GPU checks of issue 13, in one run of under 8 minutes, ending with one table.
#
# On $DEVICE (default cuda):
#   1. benchmarks/step_time.py --device $DEVICE    ms per step: plain Adam, dense VI, weight draws, Pyro SVI, ...
#                                                   and the mlp width sweep 128..2048
#   2. benchmarks/ssvi.py --part steps --device $DEVICE     dense VI against SSVI at density 0.1
#   3. benchmarks/em_sghmc.py --part step --device $DEVICE  SGHMC against SGD with momentum
#   4. pyro_sparse.cli train --method {vi,snr,ssvi,em-sghmc} --device $DEVICE --epochs 2 (digits, the CLI's defaults),
#      and snr --structure unit on a 64-400-400-10 mlp (its export's speed-ups at batch 1 and 1024, on $DEVICE)
# then one table from their JSON files and each run's metrics.json, and the elapsed seconds.
#
#   bash benchmarks/gpu.sh                        # on a GPU: JSON, logs and runs in benchmarks/results/gpu/
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh     # a quick end-to-end check of the script without a GPU
#                                                 # (results in ${TMPDIR:-/tmp}/pyro-sparse-gpu-check-cpu/)
#
# Environment:
#   DEVICE     cuda (default), cuda:1, cpu
#   QUICK=1    3 rounds per timing and widths 128,400 only (a check of the script, not figures)
#   PY         the Python interpreter (default .venv/bin/python)
#   RESULTS    the output folder (an absolute path is fine, e.g. $OUT/gpu on the lent device machine)
#   BUDGET     seconds all the pieces together may take (default 450): each piece gets at most what is left
#              and is stopped by `timeout` past that, so the table still comes before 8 minutes
#   KEEP_RUNS=1  keep the runs' *.pt and posterior.nc (deleted after the table by default: the figures are
#              the JSON files and each run's metrics.json)
# Each piece's output goes to $RESULTS/logs/<piece>.log; a failed or stopped piece is reported with its log's
# tail, the others still run, its rows in the table read "missing", and the script exits 1 after the table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-450}
if [[ "$DEVICE" == cuda* && "$QUICK" == 0 ]]; then
    RESULTS=${RESULTS:-benchmarks/results/gpu}
else  # a check of the script, not figures: outside the repository, so that nobody commits it
    RESULTS=${RESULTS:-${TMPDIR:-/tmp}/pyro-sparse-gpu-check-${DEVICE//:/-}}
fi
started=$SECONDS

if [[ "$QUICK" != 0 ]]; then
    STEP_TIME_ARGS=(--steps 3 --sweep-steps 2 --widths 128,400)
    STEPS=3
else
    STEP_TIME_ARGS=(--steps 60 --sweep-steps 20 --widths 128,400,1024,2048)
    STEPS=60
fi

# The device, first.
if [[ "$DEVICE" == cuda* ]]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device")'
    gpu_index=${DEVICE#cuda}
    gpu_index=${gpu_index#:}
    if ! nvidia-smi ${gpu_index:+-i "$gpu_index"} --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
    then
        "$PY" -c 'import sys, torch; print(torch.cuda.get_device_name(sys.argv[1]))' "$DEVICE"
    fi
else
    echo "$DEVICE: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
fi
"$PY" -c 'import pyro, pyro_sparse, torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
                                                  "pyro", pyro.__version__)'

# Nothing of an earlier run in $RESULTS may pass for this one's (ssvi.py merges into its JSON).
rm -rf "$RESULTS"/{step_time.json,ssvi_steps.json,em_sghmc_step.json,logs,table.txt} \
    "$RESULTS"/{run-vi,run-snr,run-ssvi,run-em-sghmc}
mkdir -p "$RESULTS/logs"
: > "$RESULTS/pieces.tsv"
failed=0

# piece NAME LIMIT_S COMMAND...: run COMMAND with its output in $RESULTS/logs/NAME.log, stopped after LIMIT_S
# seconds or what is left of BUDGET, whichever is less; one line of status, and NAME, status, seconds in pieces.tsv.
piece() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - started)))
    if ((left < 10)); then
        printf '%-16s skipped: the budget of %s s is spent\n' "$name" "$BUDGET"
        printf '%s\tskipped\t0\n' "$name" >> "$RESULTS/pieces.tsv"
        failed=1
        return 0
    fi
    ((left < limit)) && limit=$left
    local t0=$SECONDS status=ok rc=0
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/logs/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - t0))
    if ((rc == 124 || rc == 137)); then
        status="stopped at ${limit} s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    [[ $status == ok ]] || failed=1
    printf '%-16s %-22s %4d s\n' "$name" "$status" "$took"
    printf '%s\t%s\t%d\n' "$name" "$status" "$took" >> "$RESULTS/pieces.tsv"
    if [[ $status != ok ]]; then
        tail -n 15 "$RESULTS/logs/$name.log" | sed 's/^/    | /'
    fi
    return 0
}

piece step_time 200 "$PY" benchmarks/step_time.py --device "$DEVICE" "${STEP_TIME_ARGS[@]}" \
    --out "$RESULTS/step_time.json"
piece ssvi_steps 90 "$PY" benchmarks/ssvi.py --part steps --device "$DEVICE" --steps "$STEPS" \
    --out "$RESULTS/ssvi_steps.json"
piece em_sghmc_step 90 "$PY" benchmarks/em_sghmc.py --part step --device "$DEVICE" --steps "$STEPS" \
    --out "$RESULTS/em_sghmc_step.json"
for method in vi snr ssvi em-sghmc; do
    extra=()
    # 2 epochs of digits are 22 steps per chain after burn-in; the default 32 draws per chain need more.
    [[ $method == em-sghmc ]] && extra=(--samples 16)
    piece "train-$method" 90 "$PY" -m pyro_sparse.cli train --method "$method" --device "$DEVICE" --epochs 2 \
        "${extra[@]}" --out "$RESULTS/run-$method" --overwrite
done
# Unit-level SNR on a 64-400-400-10 mlp (digits: no data to fetch): its export's speed-ups (metrics.json, timed on
# $DEVICE) show whether the smaller network pays on the GPU too; 2 epochs is about speed, not accuracy.
piece train-snr-unit 90 "$PY" -m pyro_sparse.cli train --method snr --structure unit --hidden 400 400 \
    --device "$DEVICE" --epochs 2 --out "$RESULTS/run-snr-unit" --overwrite

# The table (also written to $RESULTS/table.txt).
RESULTS="$RESULTS" DEVICE="$DEVICE" "$PY" - <<'EOF' | tee "$RESULTS/table.txt"
import json
import os
from pathlib import Path

results = Path(os.environ["RESULTS"])
pieces = {}
for line in (results / "pieces.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    pieces[name] = (status, int(seconds))


def load(name):
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


rows = []  # (check, subject, ours ms, baseline ms, ratio, detail)


def ms(value):
    return f"{value:.2f}" if isinstance(value, int | float) else "-"


def missing(check, piece):
    status = pieces.get(piece, ("not run", 0))[0]
    log = results / "logs" / f"{piece}.log"
    rows.append((check, "missing", "-", "-", "-", f"{piece}: {status}" + (f", see {log}" if log.is_file() else "")))


step_time = load("step_time.json")
if step_time:
    for net, r in step_time["results"].items():
        rows.append(("dense VI (b) / Adam (a)", net, ms(r["ours_ms"]), ms(r["plain_ms"]),
                     f"{r['ours_over_plain']:.2f}",
                     f"draws {r['weight_draws_over_plain']:.2f}x, Pyro SVI {r['pyro_svi_ms']:.2f} ms "
                     f"({r['pyro_over_ours']:.2f}x ours), fused idiom {r['fused_idiom_over_ours']:.2f}x ours"))
    for net, r in step_time.get("width_sweep", {}).items():
        rows.append(("sweep (b) / (a)", net, ms(r["ours_ms"]), ms(r["plain_ms"]), f"{r['ours_over_plain']:.2f}",
                     f"floor (f) {r['floor_ms']:.2f} ms = {r['floor_over_plain']:.2f}x (a)"))
else:
    missing("dense VI (b) / Adam (a)", "step_time")

ssvi = load("ssvi_steps.json")
if ssvi and "steps" in ssvi:
    for net, r in ssvi["steps"].items():
        for label in ("SSVI 0.1", "SSVI 0.1, all sparse"):
            if f"{label} ms" in r:
                rows.append((f"{label} / dense VI", net, ms(r[f"{label} ms"]), ms(r["dense VI ms"]),
                             f"{r[f'{label} / dense']:.2f}",
                             f"support update {r[f'{label} update ms']:.1f} ms, amortised over 100 steps "
                             f"{r[f'{label} amortised / dense']:.2f}x dense"))
else:
    missing("SSVI 0.1 / dense VI", "ssvi_steps")

em = load("em_sghmc_step.json")
if em:
    for net, r in em["results"].items():
        rows.append(("SGHMC / SGD momentum", net, ms(r["sghmc_ms"]), ms(r["plain_sgd_momentum_ms"]),
                     f"{r['sghmc_over_plain']:.2f}",
                     f"burn-in {r['sghmc_burn_in_over_plain']:.2f}x, Gaussian noise "
                     f"{r['sghmc_gaussian_noise_over_plain']:.2f}x"))
else:
    missing("SGHMC / SGD momentum", "em_sghmc_step")

for method in ("vi", "snr", "ssvi", "em-sghmc", "snr-unit"):
    metrics = load(f"run-{method}/metrics.json")
    if metrics is None:
        missing(f"train {method}", f"train-{method}")
        continue
    wall = pieces.get(f"train-{method}", ("", 0))[1]
    rows.append((f"train {method}, {metrics['epochs']} epochs", f"{metrics['data']} {metrics['net']}", "-", "-", "-",
                 f"accuracy {100 * metrics['accuracy']:.2f} %, train_seconds {metrics['train_seconds']:.2f}, "
                 f"sparsity {metrics['sparsity']:.2f}, wall {wall} s"
                 + (f", units {metrics['units_active']}/{metrics['units_total']}, export speed-up b1 "
                    f"{metrics['export_speedup_batch_1']:.2f}x, b1024 {metrics['export_speedup_batch_1024']:.2f}x"
                    if metrics.get("units_active", 0) < metrics.get("units_total", 0) else "")))

meta = (step_time or {}).get("meta", {})
print(f"\n{os.environ['DEVICE']}: ms per step (median; batch 128 in the timings, {meta.get('steps', '?')} rounds, "
      f"sweep {meta.get('sweep_steps', '?')}), ratios ours / baseline")
header = ("check", "network / run", "ms", "base ms", "ratio", "detail")
widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
for row in [header, *rows]:
    print("  ".join(f"{cell:<{w}}" if i < 2 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(row, widths)))
          + "  " + row[5])
EOF

if [[ "${KEEP_RUNS:-0}" == 0 ]]; then
    find "$RESULTS"/run-* \( -name '*.pt' -o -name '*.nc' \) -delete 2>/dev/null || true
fi
echo "elapsed $((SECONDS - started)) s (budget $BUDGET s for the pieces; results in $RESULTS)"
exit "$failed"
