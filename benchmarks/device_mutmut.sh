#!/usr/bin/env bash
# Mutation testing (mutmut 3.8.1, config in pyproject.toml [tool.mutmut]) on a machine with many cores and no
# internet: mutmut and its dependencies come from the git-ignored wheelhouse .wheelhouse/ (build it with
# `bash benchmarks/device_mutmut.sh --build-wheelhouse`), torch/transformers/pytest from the machine's Python.
#
#   bash benchmarks/device_mutmut.sh OUTDIR [PATTERN...]
#
# PATTERN defaults to "t2edit.svf*" "t2edit.evaluation.metrics*". Environment knobs: PYTHON (default python3),
# MUTMUT_CHILDREN (default: cores - 3, at most 12), MUTMUT_SECONDS (wall-clock budget of `mutmut run`, default
# 400; the run is interrupted then and whatever was checked is kept), MUTMUT_EXTRA (patterns run afterwards
# while at least 60 s of the budget are left; default "t2edit.leakage* rewards.builtin*", empty to skip).
# OUTDIR receives at most 6 files: mutmut_run.log, mutmut_results.txt (`mutmut results --all true`),
# mutmut_summary.{json,md} and mutmut_survivors.txt (tools/mutmut_report.py), mutmut_meta.tar.gz (mutants/**.meta
# and mutmut-stats.json, to read the verdicts again with `mutmut results` after a local `mutmut run` generation).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/.wheelhouse
PY=${PYTHON:-python3}

if [[ ${1:-} == --build-wheelhouse ]]; then
  # Binary wheels for CPython 3.10-3.13 on manylinux x86_64; pip download does not evaluate markers for the
  # target version, so the Python-3.10-only needs (exceptiongroup, tomli, toml) are named explicitly.
  for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --only-binary=:all: --python-version "$v" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHEELS" mutmut==3.8.1 pytest exceptiongroup tomli toml || exit 1
  done
  du -sh "$WHEELS"; exit 0
fi

OUTDIR=${1:?usage: device_mutmut.sh OUTDIR [PATTERN...]}
shift
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PATTERNS=("$@")
[[ ${#PATTERNS[@]} -gt 0 ]] || PATTERNS=("t2edit.svf*" "t2edit.evaluation.metrics*")
read -r -a EXTRA <<<"${MUTMUT_EXTRA-t2edit.leakage* rewards.builtin*}"
CORES=$(nproc)
CHILDREN=${MUTMUT_CHILDREN:-$(( CORES > 4 ? (CORES - 3 < 12 ? CORES - 3 : 12) : 1 ))}
BUDGET=${MUTMUT_SECONDS:-400}
LOG=$OUTDIR/mutmut_run.log
START=$SECONDS
log() { echo "[device_mutmut $((SECONDS - START))s] $*" | tee -a "$LOG"; }

# One test process per core: torch must not spawn its own thread pools in each forked mutant worker. The GPU
# stays hidden: the tests run on CPU as in CI, a fork after CUDA initialisation would break the workers, and a
# job sharing the machine keeps its GPU to itself.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH

# A venv that sees the machine's packages: its Python may itself be a venv, whose site-packages
# `venv --system-site-packages` would not include, so they are added by a .pth file after the venv's own.
VENV=${MUTMUT_VENV:-/tmp/t2edit-mutmut-venv}
rm -rf "$VENV"
"$PY" -m venv --without-pip "$VENV" || { log "cannot create a venv with $PY"; exit 1; }
VSITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" - "$VSITE/_machine_site.pth" <<'EOF'
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
EOF
# pip runs from the machine's site-packages but installs into the venv; packages already there are kept.
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --disable-pip-version-check \
  mutmut==3.8.1 2>&1 | grep -v "^WARNING: Location\|outside environment\|No files were found to uninstall" | tee -a "$LOG"
"$VENV/bin/python" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, sys
import torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      *(f"{n} {md.version(n)}" for n in ("mutmut", "pytest", "libcst", "click")))
EOF
[[ -x $VENV/bin/mutmut ]] || { log "mutmut did not install"; exit 1; }

# mutmut redraws a spinner line ten times a second; the log keeps each distinct progress line once.
run_mutmut() {  # SECONDS PATTERN...: SIGINT when the budget is spent (mutmut stops its workers, keeps the verdicts)
  local secs=$1 rc; shift
  log "mutmut run --max-children $CHILDREN $* (budget ${secs}s, $CORES cores)"
  timeout -s INT -k 30 "$secs" "$VENV/bin/mutmut" run --max-children "$CHILDREN" "$@" 2>&1 \
    | tr '\r' '\n' | sed -u 's/^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] *//' | uniq >>"$LOG"
  rc=${PIPESTATUS[0]}
  log "mutmut exit $rc (124 = stopped by the budget)"
}
run_mutmut "$BUDGET" "${PATTERNS[@]}"
LEFT=$(( BUDGET - (SECONDS - START) ))
if [[ ${#EXTRA[@]} -gt 0 && $LEFT -ge 60 ]]; then
  run_mutmut "$LEFT" "${EXTRA[@]}"
fi

"$VENV/bin/mutmut" results --all true >"$OUTDIR/mutmut_results.txt" 2>>"$LOG"
"$VENV/bin/python" tools/mutmut_report.py "$OUTDIR" 2>&1 | tee -a "$LOG"
tar -czf "$OUTDIR/mutmut_meta.tar.gz" mutants/mutmut-stats.json $(find mutants -name '*.meta') 2>>"$LOG"
log "done; wrote $(ls "$OUTDIR" | tr '\n' ' ')"
