// Registers the resnet_fast CUDA kernels as torch operators (torch.ops.resnet_fast.*).
//
// Schemas are the contract shared with the Python side (resnet_fast/backends/cuda_backend.py), which
// adds the fake (meta) implementations used by torch.compile and the autograd formulas.
// bn_act_forward mutates the running statistics in place, hence Tensor(a!)? / Tensor(b!)?.
#include <torch/library.h>

#include "ops.h"

#ifdef RESNET_FAST_PYTHON_MODULE
// Built by setup.py as the Python extension module resnet_fast._C: an empty module whose import loads
// this library and runs the registrations below (no pybind11 needed). The CMake and JIT builds load
// the library with torch.ops.load_library instead and do not define this.
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "resnet_fast CUDA kernels (torch.ops.resnet_fast)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(resnet_fast, m) {
  m.def("add_relu(Tensor x, Tensor y) -> Tensor");
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, Tensor? residual, bool relu) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool residual_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("add_relu", &resnet_fast::add_relu_cuda);
  m.impl("bn_stats", &resnet_fast::bn_stats_cuda);
  m.impl("bn_act_forward", &resnet_fast::bn_act_forward_cuda);
  m.impl("bn_act_backward", &resnet_fast::bn_act_backward_cuda);
}
