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

# train from a deepmd-kit input.json (outputs in the repository folder): just train input.json [--restart model.ckpt-N.npz]
train INPUT *ARGS:
    .venv/bin/dpa3 train {{INPUT}} {{ARGS}}

# dp test-style errors of a model on labelled systems: just test-model model.npz ../shared/data/water/data_3
test-model MODEL SYSTEM *ARGS:
    .venv/bin/dpa3 test --model {{MODEL}} --system {{SYSTEM}} {{ARGS}}

# training parity with deepmd-kit's PyTorch trainer (needs deepmd-kit + torch in /work/dpref): float64, N steps
training-parity *ARGS:
    {{python}} -m dpa3_ref.training_parity {{ARGS}}

# the main job: generate EMT datasets, train a multitask DPA3, export, NVE, plots (--quick for a fast run)
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
