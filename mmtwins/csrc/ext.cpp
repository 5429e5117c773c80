// mmtwins._ext: the CPU kernels of kernels.h, for CPUs with AVX512-BF16 only.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &mmtwins::attention,
        "softmax(q k^T * scale) v of fp32 or bf16 CPU tensors (batch, heads, rows, channels), "
        "mask boolean (True: attended) or None: (batch, heads, rows, channels), a view of "
        "(batch, rows, heads, channels) memory, and if with_lse each row's log-sum-exp of its "
        "scaled scores (batch, heads, rows) in fp32 (else None)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"),
        py::arg("with_lse") = false, py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &mmtwins::attention_backward,
        "the gradients (dq, dk, dv) of attention at grad, from its output and log-sum-exps for "
        "the same q, k, v, mask and scale: q's dtype, views of (batch, rows, heads, channels) "
        "memory",
        py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm", &mmtwins::layer_norm,
        "LayerNorm over the last dim (a multiple of 16) of a contiguous fp32 or bf16 CPU tensor, "
        "fp32 weight and bias: a new tensor of its dtype",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gelu", &mmtwins::gelu,
        "the exact GELU of a contiguous fp32 or bf16 CPU tensor of a multiple of 16 values",
        py::arg("h"), py::call_guard<py::gil_scoped_release>());
  m.def("gelu_with_grad", &mmtwins::gelu_with_grad,
        "(gelu(h), grad * gelu'(h)) for contiguous fp32 or bf16 CPU tensors of one shape, a "
        "multiple of 16 values",
        py::arg("grad"), py::arg("h"), py::call_guard<py::gil_scoped_release>());
}
