# dpa3-ref tasks. `pip install -e '.[dev]'` puts `just` (rust-just) in the venv.
python := ".venv/bin/python"

# install everything (tests, export, just) into .venv
setup:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[dev]'

# the test suite (CI profile: derandomized hypothesis, few examples)
test *ARGS:
    {{python}} -m pytest -q {{ARGS}}

# many more hypothesis examples, plus the tests marked slow
test-thorough *ARGS:
    HYPOTHESIS_PROFILE=thorough {{python}} -m pytest -q -m "slow or not slow" {{ARGS}}

# build a model, evaluate a generated water box, spot-check invariances, run NVE
demo *ARGS:
    .venv/bin/dpa3 demo {{ARGS}}

# speed and memory of the water example model at 192 and 1536 atoms, against the official code
bench *ARGS:
    .venv/bin/dpa3 bench {{ARGS}}

# property-test a model file: just check-invariance ../shared/reference/water_small_f64/model.dp
check-invariance MODEL *ARGS:
    .venv/bin/dpa3 check-invariance --model {{MODEL}} {{ARGS}}

# evaluate a model on a deepmd/npy system or an extxyz file
eval MODEL SYSTEM OUT:
    .venv/bin/dpa3 eval --model {{MODEL}} --system {{SYSTEM}} --out {{OUT}}
