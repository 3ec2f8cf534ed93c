// The Python extension module fastdiv._C. It holds no Python functions: importing it loads the shared
// library, whose static initializers register the ops of fastdiv/csrc/ops.cpp with the PyTorch dispatcher.
#include <Python.h>

static PyModuleDef fastdiv_module = {PyModuleDef_HEAD_INIT, "_C",
                                     "fastdiv compiled kernels (ops under torch.ops.fastdiv)", -1,
                                     nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdiv_module); }
