#!/usr/bin/env bash
# l2r-discrete: set up and run the tutorial, or its tests.
#
#   ./tutorial.sh              set up (virtual environment, package, data) and open JupyterLab on notebooks/
#   ./tutorial.sh --headless   set up and execute every notebook without a browser (copies in build/notebooks/)
#   ./tutorial.sh test         set up and run the tests: unit tests and every notebook through nbval
#                              (extra arguments go to pytest; paths among them replace "tests notebooks")
#   ./tutorial.sh setup        set up only
#   ./tutorial.sh store [NB..] (maintainers) execute notebooks in place on the phantom and store
#                              their outputs: figures, no progress bars, no widget state
#
# Environment: L2R_VENV (default .venv), TORCH_SPEC (default torch==2.13.*; an already
# installed torch is never replaced), L2R_EXTRAS (the package's extras, default dev; dev,compare adds
# ANTs and elastix for notebook 06), L2R_DATA_DIR (data cache), L2R_QUICK=1 (shorter training);
# torch's ATEN_CPU_CAPABILITY (default, avx2, avx512) and OMP_NUM_THREADS are honoured, e.g.
# `ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 ./tutorial.sh test notebooks` (what CI runs second).
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-lab}
venv=${L2R_VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.*}

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing $torch_spec"
  python -m pip install --quiet "$torch_spec"
fi
echo "== installing the tutorial package and its tools"
python -m pip install --quiet --disable-pip-version-check -e ".[${L2R_EXTRAS:-dev}]"

case "$mode" in
  test)
    # The tests and the stored notebook outputs are made on the synthetic phantom, so the
    # test run never downloads and gives the same numbers on every machine.
    export L2R_DATA_SOURCE=synthetic MPLBACKEND=agg
    python data_download.py --synthetic
    # Paths among the arguments replace the default "tests notebooks" (e.g. `test notebooks -x`).
    paths=(tests notebooks)
    for arg in "${@:2}"; do [ "${arg#-}" = "$arg" ] && [ -e "$arg" ] && paths=() && break; done
    python -c "import torch; print('== torch', torch.__version__, '| CPU kernels', torch.backends.cpu.get_cpu_capability(), '| threads', torch.get_num_threads())"
    python -m pytest "${paths[@]}" --nbval-lax --nbval-current-env \
      --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 900 \
      -p no:cacheprovider -q "${@:2}"
    ;;
  setup)
    python data_download.py
    ;;
  store)
    # What the repository stores: run on the phantom, figures kept (MPLBACKEND unset: under agg
    # no figure is stored), tqdm's bars off (live runs show them; stored, they are residue),
    # no widget state (hundreds of kB that show nothing without a kernel).
    unset MPLBACKEND
    export L2R_DATA_SOURCE=synthetic TQDM_DISABLE=1
    python data_download.py --synthetic
    notebooks=("${@:2}")
    [ ${#notebooks[@]} -eq 0 ] && notebooks=(notebooks/[0-9][0-9]_*.ipynb)
    for nb in "${notebooks[@]}"; do
      echo "== executing and storing $nb"
      jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 \
        --ExecutePreprocessor.store_widget_state=False "$nb"
      python - "$nb" <<'PY'
import json, sys
path = sys.argv[1]
notebook = json.load(open(path, encoding="utf-8"))
notebook["metadata"].pop("widgets", None)
for cell in (cell for cell in notebook["cells"] if cell["cell_type"] == "code"):
    for output in cell["outputs"]:
        output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)  # its text/plain stays
    # a progress bar that TQDM_DISABLE did not reach (e.g. a third-party tqdm with disable=False):
    # its text on stderr, or the text fallback of tqdm's notebook widget
    cell["outputs"] = [output for output in cell["outputs"]
                       if "%|" not in "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))]
with open(path, "w", encoding="utf-8") as f:
    json.dump(notebook, f, indent=1, ensure_ascii=False)
    f.write("\n")
PY
    done
    ;;
  --headless|headless)
    python data_download.py
    mkdir -p build/notebooks
    for nb in notebooks/*.ipynb; do
      echo "== running $nb"
      jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1800 \
        --output-dir build/notebooks "$nb"
    done
    echo "Executed notebooks are in build/notebooks/"
    ;;
  lab)
    python data_download.py
    root_flag=()
    [ "$(id -u)" = 0 ] && root_flag=(--allow-root)
    exec jupyter lab "${root_flag[@]}" notebooks/
    ;;
  *)
    echo "unknown mode '$mode': use no argument, --headless, test, setup or store" >&2
    exit 2
    ;;
esac
