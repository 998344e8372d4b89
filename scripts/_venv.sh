# Sourced by scripts/test and scripts/run: make .venv on first use and install the
# project into it with its test extra; later, re-link the editable install only.
# setuptools' default editable mode hides twisted/plugins from Twisted; the strict mode
# links every file, twisted/plugins included, so twistd finds the plugin.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
editable=(--config-settings editable_mode=strict)
stamp=.venv/.delivery-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]' "${editable[@]}"
    touch "$stamp"
elif ! out=$(.venv/bin/python -m pip install --quiet --no-deps -e . "${editable[@]}" 2>&1); then
    echo "$out" >&2
    exit 1
fi
