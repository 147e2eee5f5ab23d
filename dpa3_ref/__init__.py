"""dpa3-ref: the reference implementation of the DPA3 interatomic potential in JAX/Equinox.

Importing the package turns on JAX's float64 support: the reference numbers (1e-9 agreement with
deepmd-kit) need it, and float32 models still run in float32 because every array's dtype is explicit.
"""

import jax

jax.config.update("jax_enable_x64", True)

from dpa3_ref.config import DPA3Config, water_example_config  # noqa: E402
from dpa3_ref.errors import Dpa3Error  # noqa: E402
from dpa3_ref.potential import Potential, load  # noqa: E402

__all__ = ["DPA3Config", "Dpa3Error", "Potential", "load", "water_example_config"]
