// The Python module lmeye_fast._C. It exports nothing itself: importing it
// loads this shared library, whose static initialisers (csrc/ops.cpp) register
// the lmeye_fast operators with the PyTorch dispatcher. A bare C-API module
// keeps pybind11 and its compile time out of the build.
#include <Python.h>

static PyModuleDef lmeye_fast_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "lmeye_fast CUDA operators, registered as torch.ops.lmeye_fast.* on import.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lmeye_fast_module); }
