// Every ncfast op schema, in one TORCH_LIBRARY block, and the pybind11 module ncfast._C that
// exposes how this build was made. Kernels register themselves in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>

#include <ncfast/loss.h>

TORCH_LIBRARY(ncfast, m) {
  // Rescaled MSE (theory.md 2.1): per-sample loss sum_j w_j (z_j - M [j = y])^2 with
  // w_j = k on the target class and 1 elsewhere; rows whose label is ignore_index give 0.
  m.def("rescaled_mse(Tensor logits, Tensor target, float k, float M, int ignore_index) -> Tensor");
  // Labels are range-checked by the forward ops: on CPU at once, on CUDA on the device (the row
  // gets zero loss, the label is raised by the next loss op or ncfast.check_errors()). Every op
  // treats a row whose label is out of range like an ignored row. Autograd: loss_autograd.cpp.
  // grad_logits[i, j] = 2 grad[i] w_ij (z_ij - M [j = y_i]); zero on rows that do not count.
  m.def(
      "rescaled_mse_backward(Tensor grad, Tensor logits, Tensor target, float k, float M, "
      "int ignore_index) -> Tensor");
  // The reduced loss in one pass: loss = row_scale * sum_i loss_i over counted rows, in the
  // logits' dtype (summed in float64, deterministically), with row_scale = scale / #counted
  // rows if mean else scale (a 0-dim tensor of the accumulate type, kept for the backward).
  m.def(
      "rescaled_mse_reduced(Tensor logits, Tensor target, float k, float M, int ignore_index, "
      "float scale, bool mean) -> (Tensor loss, Tensor row_scale)");
  // grad_logits[i, j] = 2 grad row_scale w_ij (z_ij - M [j = y_i]) on counted rows, in one pass.
  m.def(
      "rescaled_mse_reduced_backward(Tensor grad, Tensor row_scale, Tensor logits, "
      "Tensor target, float k, float M, int ignore_index) -> Tensor");
  // The label rule alone, for the fused linear loss: raises at once on CPU, records on the
  // device on CUDA (no host sync). op names the public function in the message.
  m.def("check_labels(Tensor target, int num_classes, int ignore_index, str op) -> ()");
  // The fused linear loss's guard budget (gram method): count, a 0-dim int64 tensor, is the
  // number of rows the cancellation guard flagged; more than budget raises at once on CPU and is
  // recorded on the device on CUDA (raised like a bad label: next loss op, check_errors()).
  m.def("check_guard_budget(Tensor count, int budget) -> ()");

  // Class statistics (theory.md 5.8, shifted form): one pass over a batch. Row i of class k is
  // shifted by shift[k] (the class's reference point); returns per-class counts, sums and
  // squared norms of the shifted rows, and the shifted rows themselves (for one Gram product),
  // all in the accumulate type of the features (= shift's dtype). A row whose label is outside
  // [0, K) (ClassStats marks rows to leave out with -1) is skipped: it adds nothing and its
  // shifted row is zero.
  m.def(
      "class_moments(Tensor features, Tensor labels, Tensor shift) -> "
      "(Tensor counts, Tensor sums, Tensor sq, Tensor shifted)");
  // The same, shifting the rows of features in place (contiguous, of shift's dtype): no new
  // (B, d) tensor, whose first touch costs more than the pass itself on a CPU.
  m.def(
      "class_moments_(Tensor(a!) features, Tensor labels, Tensor shift) -> "
      "(Tensor counts, Tensor sums, Tensor sq)");
  // NC4 (theory.md 5.6), after one GEMM of a batch against [W; means] (scores, B x 2K): counts
  // rows whose classifier prediction argmax_k (scores[:, k] + bias_k) differs from the nearest
  // class mean argmin_k (sq_norms_k - 2 scores[:, K + k]); rows where the optional bool mask
  // skip is true are not counted. Returns a 0-dim int64 count.
  m.def("nc4_mismatches(Tensor scores, Tensor? bias, Tensor sq_norms, Tensor? skip=None) -> "
        "Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ncfast C++/CUDA kernels (ops live in torch.ops.ncfast)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = NCFAST_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(NCFAST_WITH_CUDA);
    info["cuda_arch_list"] = NCFAST_CUDA_ARCH_LIST;
    info["compiler"] = NCFAST_COMPILER;
#if NCFAST_WITH_CUDA
    info["cuda_compiler"] = NCFAST_CUDA_COMPILER;
#else
    info["cuda_compiler"] = pybind11::none();
#endif
    return info;
  });
  m.def("cuda_target_checks_enabled", &ncfast::cuda_target_checks_enabled);
  m.def("set_cuda_target_checks", &ncfast::set_cuda_target_checks, pybind11::arg("enabled"));
  m.def("raise_pending_label_errors", &ncfast::raise_pending_label_errors,
        "Raise the first label error recorded on a CUDA device and not yet raised.");
  m.def("label_error_devices", &ncfast::label_error_devices,
        "The CUDA devices on which a loss kernel may have recorded a label error.");
}
