// Autograd of the rescaled-MSE ops, in C++ (as torchvision does for its ops), so that an eager
// call runs no Python autograd code. Each backward is written with the ops themselves, called
// through the dispatcher, so it is differentiable again (double backward, and any order):
// theory.md 2.4. torch.func transforms use the autograd.Functions of ncfast/_ops.py instead.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <ncfast/loss.h>

namespace ncfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double, double,
                                          int64_t)>&
per_row_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ncfast::rescaled_mse", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                               double, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, double, double, int64_t)>&
per_row_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ncfast::rescaled_mse_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double, double, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, double, int64_t, double, bool)>&
reduced_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ncfast::rescaled_mse_reduced", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                    double, int64_t, double, bool)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double, double,
                                          int64_t)>&
reduced_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ncfast::rescaled_mse_reduced_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, double, int64_t)>();
  return op;
}

struct LossArgs {
  double k, M;
  int64_t ignore_index;
};

void save_args(AutogradContext* ctx, double k, double M, int64_t ignore_index) {
  ctx->saved_data["k"] = k;
  ctx->saved_data["M"] = M;
  ctx->saved_data["ignore_index"] = ignore_index;
}

LossArgs saved_args(AutogradContext* ctx) {
  return {ctx->saved_data["k"].toDouble(), ctx->saved_data["M"].toDouble(),
          ctx->saved_data["ignore_index"].toInt()};
}

// Per-row loss. d loss_i / d z_ij = 2 w_ij r_ij: the backward op with grad_i.
class PerRow : public torch::autograd::Function<PerRow> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, double k, double M, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = per_row_op().call(logits, target, k, M, ignore_index);
    ctx->save_for_backward({logits, target});
    save_args(ctx, k, M, ignore_index);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const LossArgs a = saved_args(ctx);
    at::Tensor d_logits;
    if (ctx->needs_input_grad(0)) {
      d_logits = per_row_backward_op().call(grads[0], saved[0], saved[1], a.k, a.M,
                                            a.ignore_index);
    }
    return {d_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Per-row backward b(g, z) = 2 g w (z - M e_y): linear in g, affine in z. Its cotangent v goes
// to g as sum_j b(1, z)_ij v_ij and to z as b(g, v) with M = 0.
class PerRowBackward : public torch::autograd::Function<PerRowBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad,
                            const at::Tensor& logits, const at::Tensor& target, double k,
                            double M, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = per_row_backward_op().call(grad, logits, target, k, M, ignore_index);
    ctx->save_for_backward({grad, logits, target});
    save_args(ctx, k, M, ignore_index);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &logits = saved[1], &target = saved[2];
    const at::Tensor& v = grads[0];
    const LossArgs a = saved_args(ctx);
    at::Tensor d_grad, d_logits;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor slope = per_row_backward_op().call(at::ones_like(grad), logits, target,
                                                          a.k, a.M, a.ignore_index);
      d_grad = slope.to(grad.scalar_type()).mul(v.to(grad.scalar_type())).sum(1);
    }
    if (ctx->needs_input_grad(1)) {
      d_logits = per_row_backward_op().call(grad, v.to(logits.scalar_type()), target, a.k, 0.0,
                                            a.ignore_index);
    }
    return {d_grad, d_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Reduced loss: (loss, row_scale), row_scale not differentiable.
class Reduced : public torch::autograd::Function<Reduced> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, double k, double M,
                               int64_t ignore_index, double scale, bool mean) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, row_scale] = reduced_op().call(logits, target, k, M, ignore_index, scale, mean);
    ctx->mark_non_differentiable({row_scale});
    ctx->save_for_backward({logits, target, row_scale});
    save_args(ctx, k, M, ignore_index);
    return {loss, row_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const LossArgs a = saved_args(ctx);
    at::Tensor d_logits;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      d_logits = reduced_backward_op().call(grads[0], saved[2], saved[0], saved[1], a.k, a.M,
                                            a.ignore_index);
    }
    return {d_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Reduced backward b(g, z) = 2 g s w (z - M e_y), g 0-dim: as PerRowBackward, summed over all.
class ReducedBackward : public torch::autograd::Function<ReducedBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad,
                            const at::Tensor& row_scale, const at::Tensor& logits,
                            const at::Tensor& target, double k, double M, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out =
        reduced_backward_op().call(grad, row_scale, logits, target, k, M, ignore_index);
    ctx->save_for_backward({grad, row_scale, logits, target});
    save_args(ctx, k, M, ignore_index);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &row_scale = saved[1], &logits = saved[2],
                     &target = saved[3];
    const at::Tensor& v = grads[0];
    const LossArgs a = saved_args(ctx);
    at::Tensor d_grad, d_logits;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor slope = reduced_backward_op().call(
          at::ones_like(grad), row_scale, logits, target, a.k, a.M, a.ignore_index);
      const auto acc = loss_dtype(logits.scalar_type());
      d_grad = slope.to(acc).mul(v.to(acc)).sum().to(grad.scalar_type());
    }
    if (ctx->needs_input_grad(2)) {
      d_logits = reduced_backward_op().call(grad, row_scale, v.to(logits.scalar_type()), target,
                                            a.k, 0.0, a.ignore_index);
    }
    return {d_grad,       at::Tensor(), d_logits,    at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor per_row_autograd(const at::Tensor& logits, const at::Tensor& target, double k,
                            double M, int64_t ignore_index) {
  return PerRow::apply(logits, target, k, M, ignore_index);
}

at::Tensor per_row_backward_autograd(const at::Tensor& grad, const at::Tensor& logits,
                                     const at::Tensor& target, double k, double M,
                                     int64_t ignore_index) {
  return PerRowBackward::apply(grad, logits, target, k, M, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> reduced_autograd(const at::Tensor& logits,
                                                    const at::Tensor& target, double k,
                                                    double M, int64_t ignore_index,
                                                    double scale, bool mean) {
  auto out = Reduced::apply(logits, target, k, M, ignore_index, scale, mean);
  return {out[0], out[1]};
}

at::Tensor reduced_backward_autograd(const at::Tensor& grad, const at::Tensor& row_scale,
                                     const at::Tensor& logits, const at::Tensor& target,
                                     double k, double M, int64_t ignore_index) {
  return ReducedBackward::apply(grad, row_scale, logits, target, k, M, ignore_index);
}

}  // namespace
}  // namespace ncfast

TORCH_LIBRARY_IMPL(ncfast, Autograd, m) {
  m.impl("rescaled_mse", &ncfast::per_row_autograd);
  m.impl("rescaled_mse_backward", &ncfast::per_row_backward_autograd);
  m.impl("rescaled_mse_reduced", &ncfast::reduced_autograd);
  m.impl("rescaled_mse_reduced_backward", &ncfast::reduced_backward_autograd);
}
