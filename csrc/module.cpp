// The Python module guide_mega._C. It exposes nothing: importing it loads this library, whose static
// TORCH_LIBRARY blocks register torch.ops.guide_mega.*. A bare module (no pybind11) keeps the build short.

#include <Python.h>

static PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled torch ops of guide_mega; importing this module registers torch.ops.guide_mega.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&module_def);
}
