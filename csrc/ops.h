// Host entry points of the resnet_fast CUDA kernels (registered as torch ops in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace resnet_fast {

// relu(x + y); output in x's layout (see add_relu.cu).
at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& y);

// Per-channel (mean, biased variance) of a [N, C, H, W] tensor over N*H*W, float32 [C] each.
std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x);

// relu?(batch_norm(x) + residual). Returns (out, save_mean, save_invstd); the last two are float32
// [C] (batch statistics when training, running statistics otherwise). running_mean / running_var are
// updated in place when training and defined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& residual, bool relu);

// Gradients of bn_act_forward: (grad_x, grad_weight, grad_bias, grad_residual). grad_weight and
// grad_bias are float32 [C]; grad_residual is empty ([0]) unless residual_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu, bool residual_grad);

}  // namespace resnet_fast
