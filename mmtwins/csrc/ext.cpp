// mmtwins._ext: the bf16 CPU kernels of bf16.h, for CPUs with AVX512-BF16 only.
#include <torch/extension.h>

#include "bf16.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_bf16_", &mmtwins::softmax_bf16_,
        "in place: softmax over the first keys scores of each row of scale * scores, a "
        "contiguous bf16 CPU tensor (rows of a multiple of 16 scores), zeros beyond",
        py::arg("scores"), py::arg("keys"), py::arg("scale") = 1.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm_bf16", &mmtwins::layer_norm_bf16,
        "LayerNorm over the last dim (a multiple of 16) of a contiguous bf16 CPU tensor, fp32 "
        "weight and bias: a new bf16 tensor",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
}
