// Mask-aware compacted conv / BN / linear ops (PAAM_METHOD.md §6.3, after_select="masked").
//
// In masked training the parameters keep their full size (the optimizer, DDP buckets and
// checkpoints never change shape between selection events) while the activations only carry the
// alive channels. These ops take the full-size parameters plus the alive channel indices, gather
// the (small) parameters, and run conv / BN / linear on the compact activations. They are
// CompositeImplicitAutograd: autograd differentiates the ATen ops they are made of, so the
// backward also runs on the alive channels only (cuDNN / oneDNN kernels on compact tensors), and
// the gradients of the full-size parameters come back through index_select's backward, i.e.
// scattered into full-size tensors with exact zeros at the dead entries. Activations are never
// gathered.
//
// Python references with the same semantics: paam_fast/masked_ops.py.

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace paam_fast {

using at::Tensor;

// An index tensor must be 1-D int64 on the parameter's device, non-empty, strictly increasing
// (sorted, no duplicates) and inside [0, size). The value checks read the tensor on the host,
// so callers that validated the indices once pass check=false in the training step.
// Values can only be read from a real tensor (not while torch.compile traces with fake ones).
static bool has_data(const Tensor& t) {
  const auto ks = t.key_set();
  return !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::Functionalize) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && t.device().type() != at::kMeta;
}

static void check_index(const Tensor& idx, const c10::SymInt& size, const char* arg,
                        const Tensor& param, bool check_values) {
  TORCH_CHECK(idx.dim() == 1, arg, " must be a 1-D index tensor, got ", idx.dim(), " dims");
  TORCH_CHECK(idx.scalar_type() == at::kLong, arg, " must be int64 (torch.long), got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == param.device(), arg, " is on ", idx.device(),
              " but the parameters are on ", param.device());
  TORCH_SYM_CHECK(idx.sym_numel().sym_gt(0), arg,
                  " is empty: a unit keeps at least one alive channel");
  if (!check_values || !has_data(idx) || size.is_symbolic()) return;
  const int64_t n_max = size.as_int_unchecked();
  auto cpu = idx.to(at::kCPU);
  auto p = cpu.data_ptr<int64_t>();
  int64_t n = cpu.numel();
  TORCH_CHECK(p[0] >= 0 && p[n - 1] < n_max, arg, " holds indices outside [0, ", n_max, "): first ",
              p[0], ", last ", p[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(p[i] != p[i - 1], arg, " holds the duplicate index ", p[i]);
    TORCH_CHECK(p[i] > p[i - 1], arg, " must be sorted ascending (index ", p[i], " follows ",
                p[i - 1], ")");
  }
}

static void check_same(const Tensor& t, const Tensor& ref, const char* arg) {
  TORCH_CHECK(t.device() == ref.device(), arg, " is on ", t.device(), " but the weight is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), arg, " has dtype ", t.scalar_type(),
              " but the weight has ", ref.scalar_type());
}

// y = conv2d(x, W', b') with W' = (g·W)[out_idx][:, in_idx], b' = (g·b)[out_idx].
// x: (N, len(in_idx) or C_in, H, W) compact input; weight: (C_out, C_in/groups, kh, kw) full;
// a depthwise conv (groups == C_out == C_in) keeps channels out_idx and groups = len(out_idx).
Tensor masked_conv2d(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& gate, const std::optional<Tensor>& out_idx,
                     const std::optional<Tensor>& in_idx, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     bool check) {
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (C_out, C_in/groups, kh, kw), got ",
              weight.dim(), " dims");
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), " dims");
  check_same(x, weight, "x");
  const c10::SymInt c_out = weight.sym_size(0);
  const bool depthwise = groups > 1 && c_out.sym_eq(groups).guard_bool(__FILE__, __LINE__) &&
                         weight.sym_size(1).sym_eq(1).guard_bool(__FILE__, __LINE__);
  TORCH_CHECK(groups == 1 || depthwise, "groups must be 1 or depthwise (groups == C_out), got ",
              groups);
  Tensor w = weight;
  c10::SymInt g_eff = groups;
  if (out_idx.has_value()) {
    check_index(*out_idx, c_out, "out_idx", weight, check);
    w = w.index_select(0, *out_idx);
    if (depthwise) g_eff = out_idx->sym_numel();
  }
  if (in_idx.has_value()) {
    TORCH_CHECK(!depthwise, "in_idx must be None for a depthwise conv (out_idx selects both)");
    check_index(*in_idx, weight.sym_size(1), "in_idx", weight, check);
    w = w.index_select(1, *in_idx);
  }
  const c10::SymInt c_in = depthwise ? w.sym_size(0) : w.sym_size(1);
  TORCH_SYM_CHECK(x.sym_size(1).sym_eq(c_in), "x has ", x.sym_size(1),
                  " channels but the alive input channels are ", c_in);
  std::optional<Tensor> b;
  if (bias.has_value() && bias->defined()) {
    check_same(*bias, weight, "bias");
    b = out_idx.has_value() ? bias->index_select(0, *out_idx) : *bias;
  }
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->dim() == 1, "gate must be 1-D (C_out,), got ", gate->dim(), " dims");
    TORCH_SYM_CHECK(gate->sym_size(0).sym_eq(c_out), "gate must be (C_out,) = (", c_out,
                    ",), got ", gate->sym_sizes());
    Tensor g = out_idx.has_value() ? gate->index_select(0, *out_idx) : *gate;
    g = g.to(w.scalar_type());
    w = w * g.view({-1, 1, 1, 1});
    if (b.has_value()) b = *b * g;
  }
  return at::conv2d_symint(x, w, b, c10::fromIntArrayRefSlow(stride),
                           c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
                           g_eff);
}

// Training- or eval-mode batch norm of the compact channels idx of a BN with full-size
// parameters and running statistics; γ' = g·γ, β' = g·β; in training the running statistics of
// the channels in idx are updated and every other channel's are left as they were.
Tensor masked_batch_norm(const Tensor& x, const std::optional<Tensor>& weight,
                         const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& running_mean,
                         const std::optional<Tensor>& running_var,
                         const std::optional<Tensor>& gate, const std::optional<Tensor>& idx,
                         bool training, double momentum, double eps, bool check) {
  TORCH_CHECK(x.dim() >= 2, "x must be (N, C, ...), got ", x.dim(), " dims");
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_stats = running_mean.has_value() && running_mean->defined();
  const c10::SymInt full = has_w ? weight->sym_size(0)
                                 : (has_stats ? running_mean->sym_size(0) : x.sym_size(1));
  auto pick = [&](const Tensor& t) { return idx.has_value() ? t.index_select(0, *idx) : t; };
  if (idx.has_value()) {
    const Tensor& ref = has_w ? *weight : (has_stats ? *running_mean : x);
    check_index(*idx, full, "idx", ref, check);
  }
  const c10::SymInt c = idx.has_value() ? idx->sym_numel() : full;
  TORCH_SYM_CHECK(x.sym_size(1).sym_eq(c), "x has ", x.sym_size(1), " channels but ", c,
                  " are alive");
  std::optional<Tensor> w, b, rm, rv;
  if (has_w) { check_same(x, *weight, "x"); w = pick(*weight); }
  if (has_b) b = pick(*bias);
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->dim() == 1, "gate must be 1-D (C,), got ", gate->dim(), " dims");
    TORCH_SYM_CHECK(gate->sym_size(0).sym_eq(full), "gate must be (C,) = (", full, ",), got ",
                    gate->sym_sizes());
    Tensor g = pick(*gate).to(x.scalar_type());
    w = w.has_value() ? Tensor(*w * g) : g;
    if (b.has_value()) b = *b * g;
  }
  if (has_stats) {
    TORCH_CHECK(running_var.has_value() && running_var->defined(),
                "running_mean is given but running_var is not");
    rm = pick(*running_mean);
    rv = pick(*running_var);
  }
  Tensor y = at::batch_norm(x, w, b, rm, rv, training || !has_stats, momentum, eps,
                            at::globalContext().userEnabledCuDNN());
  if (training && has_stats && idx.has_value()) {
    // write back only the alive channels' statistics (buffers: no autograd involved)
    at::NoGradGuard no_grad;
    running_mean->index_copy_(0, *idx, *rm);
    running_var->index_copy_(0, *idx, *rv);
  }
  return y;
}

// y = x · W[:, feat_idx]ᵀ + b, x (N, len(feat_idx)) compact features.
Tensor masked_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& in_idx, bool check) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.dim(), " dims");
  check_same(x, weight, "x");
  Tensor w = weight;
  if (in_idx.has_value()) {
    check_index(*in_idx, weight.sym_size(1), "in_idx", weight, check);
    w = w.index_select(1, *in_idx);
  }
  TORCH_SYM_CHECK(x.sym_size(-1).sym_eq(w.sym_size(1)), "x has ", x.sym_size(-1),
                  " features but ", w.sym_size(1), " are alive");
  return at::linear(x, w, bias);
}

}  // namespace paam_fast

TORCH_LIBRARY(paam_fast, m) {
  m.def("masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor? out_idx, "
        "Tensor? in_idx, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "bool check=True) -> Tensor");
  m.def("masked_batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor? gate, Tensor? idx, bool training, float momentum, "
        "float eps, bool check=True) -> Tensor");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? in_idx, "
        "bool check=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(paam_fast, CompositeImplicitAutograd, m) {
  m.impl("masked_conv2d", &paam_fast::masked_conv2d);
  m.impl("masked_batch_norm", &paam_fast::masked_batch_norm);
  m.impl("masked_linear", &paam_fast::masked_linear);
}

// The module is only a carrier for the registrations above (import paam_fast._C).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
