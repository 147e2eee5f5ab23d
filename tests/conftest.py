"""Hypothesis profiles: "ci" (default) draws the same few cases on every run; "thorough" draws many fresh ones.

Select with HYPOTHESIS_PROFILE=thorough pytest ...
"""

import os

# Tests compile many small XLA programs and run each briefly: LLVM's cheapest optimisation level halves
# compile time (10.7 s -> 4.9 s for the small reference model) at no cost to the suite's run time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=10, deadline=None, database=None)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each compiled architecture holds ~350 memory
    mappings; a few hundred in one process reach the kernel's limit (65,530) and XLA then fails to allocate."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
