"""dpa3_onnx: run a DPA3 model exported by `dpa3 export` (ONNX contract v1) with numpy, onnxruntime and vesin.

No JAX, no dpa3_ref: this package is what a program that only wants energies and forces installs.

    from dpa3_onnx import OnnxPotential
    potential = OnnxPotential("model.onnx")                     # threads=None: onnxruntime's default (all cores)
    out = potential.evaluate(coord, ["O", "H", "H"], cell)      # periodic; cell=None: open boundaries
    out = potential.evaluate(coord, types, n_local=n)           # a host's local atoms first, then its ghosts
    out["energy"], out["atom_energy"], out["forces"], out["virial"]

    from dpa3_onnx.calculator import DPA3OnnxCalculator        # ASE: energy, energies, forces, stress

The contract the file keeps (inputs, outputs, selection rule, ghost atoms, metadata) is export/README.md;
`dpa3_onnx.inputs` implements its selection rule in numpy and is the reference for other clients.
"""

from dpa3_onnx.contract import CONTRACT_VERSION, ModelInfo, Dpa3OnnxError
from dpa3_onnx.inputs import model_inputs, reverse_neighbor_table
from dpa3_onnx.session import OnnxPotential, choose_providers

__all__ = ["CONTRACT_VERSION", "Dpa3OnnxError", "ModelInfo", "OnnxPotential", "choose_providers", "model_inputs",
           "reverse_neighbor_table"]
