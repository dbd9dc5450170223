#!/usr/bin/env bash
# Installs what tests/test_browser.py needs: Debian's Chromium (apt) and the Python
# `playwright` package (PyPI; its wheel bundles the driver). Never downloads a browser
# (no `playwright install`). Idempotent, non-interactive; prints one line saying what it did.
#
#   bash .ci/install_browser.sh      (from .ci/run; works before or after the venv exists)
#
# playwright goes into the project's Python: $PYTHON if set, else the active virtual
# environment, else ${L2R_VENV:-.venv}/bin/python; never into the system Python. If none
# exists yet, `pip install -e ".[dev]"` is expected to bring it later.
# Never fails the CI run: where nothing can be installed the browser test skips with a reason.

l2r_install_browser() {
    local did=() python_bin=""
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

    if [ -x /usr/bin/chromium ]; then
        did+=("chromium present")
    elif ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        did+=("chromium missing, no apt-get as root here (browser test will skip)")
    elif DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confold chromium fonts-dejavu-core </dev/null >/dev/null 2>&1 \
        && [ -x /usr/bin/chromium ]; then
        did+=("installed chromium with apt")
    else
        did+=("could NOT install chromium with apt (browser test will skip)")
    fi

    if [ -n "${PYTHON:-}" ]; then
        python_bin=$PYTHON
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        python_bin=$VIRTUAL_ENV/bin/python
    elif [ -x "$repo/${L2R_VENV:-.venv}/bin/python" ]; then
        python_bin=$repo/${L2R_VENV:-.venv}/bin/python
    fi
    if [ -z "$python_bin" ]; then
        did+=("no project Python yet, playwright left to pip install -e .[dev]")
    elif "$python_bin" -c "import playwright.sync_api" >/dev/null 2>&1; then
        did+=("playwright present")
    elif "$python_bin" -m pip install -q --disable-pip-version-check playwright </dev/null >/dev/null 2>&1; then
        did+=("pip-installed playwright into $python_bin")
    else
        did+=("could NOT pip-install playwright into $python_bin (browser test will skip)")
    fi

    local line="install_browser:" item sep=" "
    for item in "${did[@]}"; do line+="$sep$item"; sep="; "; done
    echo "$line"
    return 0
}

l2r_install_browser
