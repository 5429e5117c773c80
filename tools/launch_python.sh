# Sourced by the launch scripts (dist_*.sh, slurm_*.sh) once they have set TOOLS: sets PYTHON,
# the interpreter that runs the tools, and names it on stderr. In order: PYTHON as given; the
# environment the user activated (a virtualenv, or a conda environment other than base);
# the checkout's .venv, which `make setup` installs; python.
if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ] || [ "${CONDA_DEFAULT_ENV:-base}" != base ]; then
        PYTHON=python
    elif [ -x "$TOOLS/../.venv/bin/python" ]; then
        PYTHON="$TOOLS/../.venv/bin/python"
    else
        PYTHON=python
    fi
fi
found=$(command -v "$PYTHON" || echo "$PYTHON (not found)")
echo "$(basename "$0"): running the tools with $found" >&2
