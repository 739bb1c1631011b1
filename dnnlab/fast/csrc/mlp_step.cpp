// dnnlab::mlp_step: one training step of a plain multilayer perceptron on the CPU, in one call from Python.
//
// The forward pass, the cross-entropy and the backward pass of [dropout] (Linear -> activation [-> dropout])* ->
// Linear: the activations and dropout's masks with the ATen kernels autograd would run (elu/elu_backward, bernoulli,
// ...), the matrix products with the MKL routine ATen's would call (sgemm), but without autograd's graph, its
// per-node bookkeeping, ATen's per-call overhead and Python's per-operation overhead, which together cost more than
// the arithmetic at batch 32. The numbers equal autograd's up to float rounding (tested). The weight and bias
// gradients are written into preallocated tensors (the parameters' .grad), so any torch optimizer can take the
// step afterwards.
//
// With the optimizer's flat state (dnnlab/fast/flat_adam.py), mlp_step also takes the Adam/AdamW update, with the arithmetic of
// torch's fused CPU kernel, element for element (tested bit for bit): at batch 32 the Python and dispatch around a
// separate update call cost about 5 % of the step, and the gradients are still in the cache here.
//
// dnnlab::stack_step: the same step (and update) for a stack of jobs of one shape (a stacked sweep), the jobs spread
// over the threads.
//
// Built on first use by dnnlab/fast/native.py (torch.utils.cpp_extension); per-operator headers keep that to seconds.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/elu_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/mish.h>
#include <ATen/ops/mish_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/softplus_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <tuple>
#include <string>
#include <vector>

// MKL's per-thread thread count (mkl_set_num_threads_local in mkl_service.h; exported by libtorch_cpu where torch
// uses MKL; weak: null elsewhere).
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int);
// The Fortran BLAS product that ATen's float32 addmm and mm call where torch uses MKL (exported by libtorch_cpu
// there; weak: null elsewhere).
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                                             const int* k, const float* alpha, const float* a, const int* lda,
                                             const float* b, const int* ldb, const float* beta, float* c,
                                             const int* ldc);

namespace {

// Inside a parallel region MKL would pick other kernels than on one thread outside it, and a job's numbers would
// depend on the thread count: one MKL thread for the jobs of a stack, always, restored on the way out.
struct OneMklThread {
  int before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  ~OneMklThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
  }
};

enum class Act { elu, relu, leaky_relu, tanh, sigmoid, gelu, gelu_tanh, silu, mish, softplus };

Act parse(c10::string_view name) {
  static const std::pair<const char*, Act> names[] = {
      {"elu", Act::elu},   {"relu", Act::relu},           {"leaky_relu", Act::leaky_relu}, {"tanh", Act::tanh},
      {"sigmoid", Act::sigmoid}, {"gelu", Act::gelu},     {"gelu_tanh", Act::gelu_tanh},   {"silu", Act::silu},
      {"mish", Act::mish}, {"softplus", Act::softplus}};
  for (const auto& [n, a] : names)
    if (name == n) return a;
  TORCH_CHECK(false, "dnnlab::mlp_step: unknown activation ", name);
}

// args: elu (alpha, scale, input_scale; SELU is elu with its two constants), leaky_relu (slope),
// softplus (beta, threshold); the others take none.
at::Tensor forward(Act a, const at::Tensor& z, at::ArrayRef<double> args) {
  switch (a) {
    case Act::elu: return at::elu(z, args[0], args[1], args[2]);
    case Act::relu: return at::relu(z);
    case Act::leaky_relu: return at::leaky_relu(z, args[0]);
    case Act::tanh: return at::tanh(z);
    case Act::sigmoid: return at::sigmoid(z);
    case Act::gelu: return at::gelu(z, "none");
    case Act::gelu_tanh: return at::gelu(z, "tanh");
    case Act::silu: return at::silu(z);
    case Act::mish: return at::mish(z);
    case Act::softplus: return at::softplus(z, args[0], args[1]);
  }
  TORCH_CHECK(false, "unreachable");
}

// The gradient with respect to the pre-activation z, from the gradient g of the output h = act(z), as
// autograd's derivative formulas compute it (from z or from h, whichever each formula uses).
at::Tensor backward(Act a, const at::Tensor& g, const at::Tensor& z, const at::Tensor& h,
                    at::ArrayRef<double> args) {
  switch (a) {
    case Act::elu: return at::elu_backward(g, args[0], args[1], args[2], false, z);
    case Act::relu: return at::threshold_backward(g, h, 0);
    case Act::leaky_relu: return at::leaky_relu_backward(g, z, args[0], false);
    case Act::tanh: return at::tanh_backward(g, h);
    case Act::sigmoid: return at::sigmoid_backward(g, h);
    case Act::gelu: return at::gelu_backward(g, z, "none");
    case Act::gelu_tanh: return at::gelu_backward(g, z, "tanh");
    case Act::silu: return at::silu_backward(g, z);
    case Act::mish: return at::mish_backward(g, z);
    case Act::softplus: return at::softplus_backward(g, z, args[0], args[1]);
  }
  TORCH_CHECK(false, "unreachable");
}

// Mean cross-entropy of the logits z (B x C) against y, its gradient dL/dz written into g, and the number of rows
// whose largest logit is the label's.
double cross_entropy(const at::Tensor& z, const at::Tensor& y, at::Tensor& g, int64_t& hits) {
  const int64_t B = z.size(0), C = z.size(1);
  const float* zp = z.const_data_ptr<float>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  float* gp = g.mutable_data_ptr<float>();
  double total = 0;
  hits = 0;
  for (int64_t i = 0; i < B; ++i) {
    const float* r = zp + i * C;
    float* gr = gp + i * C;
    const int64_t label = yp[i];
    TORCH_CHECK(label >= 0 && label < C, "dnnlab::mlp_step: label ", label, " outside [0, ", C, ")");
    int64_t arg = 0;
    for (int64_t c = 1; c < C; ++c)
      if (r[c] > r[arg]) arg = c;
    const float m = r[arg];
    float s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(r[c] - m);
    const float lse = m + std::log(s);
    total += lse - r[label];
    hits += arg == label;
    for (int64_t c = 0; c < C; ++c) gr[c] = std::exp(r[c] - lse) / B;  // softmax / B
    gr[label] -= 1.0f / B;
  }
  return total / B;
}

// One network's layers as the step sees them. kernels[l] is layer l's weight as nn.Linear keeps it (out x in), or,
// with in_by_out, as a stack keeps each job's slice (in x out: x @ W). The gradient lists hold the layers from
// `first` up (the ones below are frozen: no gradients, no backward pass through them).
struct Layers {
  std::vector<at::Tensor> kernels, biases, kernel_grads, bias_grads;
  int64_t first;
  bool in_by_out;
};

// out = op(a) @ op(b), or out += op(a) @ op(b) with accumulate, where op(a) is a or, with ta, a's transpose (b
// likewise). On contiguous tensors with MKL, its sgemm is called directly, as ATen's addmm and mm call it, but
// without the dispatcher, checks and allocations of each ATen call, which at batch 32 cost as much as the arithmetic
// of a 100 x 100 layer; elsewhere, through ATen.
void matmul(at::Tensor& out, const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, bool accumulate) {
  if (!sgemm_ || !out.is_contiguous() || !a.is_contiguous() || !b.is_contiguous()) {
    const at::Tensor a_ = ta ? a.t() : a, b_ = tb ? b.t() : b;
    if (accumulate)
      out.addmm_(a_, b_);
    else
      at::mm_out(out, a_, b_);
    return;
  }
  // row-major out (m x n) = op(a) @ op(b) is column-major out^T = op(b)^T @ op(a)^T
  const int m = out.size(0), n = out.size(1), k = ta ? a.size(0) : a.size(1), lda = ta ? m : k, ldb = tb ? k : n;
  const float one = 1, beta = accumulate ? 1 : 0;
  sgemm_(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &one, b.const_data_ptr<float>(), &ldb, a.const_data_ptr<float>(),
         &lda, &beta, out.mutable_data_ptr<float>(), &n);
}

// Every row of the contiguous matrix out set to the vector v.
void rows_of(at::Tensor& out, const at::Tensor& v) {
  TORCH_CHECK(out.is_contiguous() && v.is_contiguous() && out.size(1) == v.numel(), "dnnlab: contiguous biases");
  const int64_t n = v.numel();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < out.size(0); ++i) std::copy(vp, vp + n, op + i * n);
}

// out (rows x n) = zt^T + the bias b in every row, for contiguous out, zt (n x rows) and b.
void transpose_plus(at::Tensor& out, const at::Tensor& zt, const at::Tensor& b) {
  TORCH_CHECK(out.is_contiguous() && zt.is_contiguous() && b.is_contiguous(), "dnnlab: contiguous biases");
  const int64_t rows = out.size(0), n = out.size(1);
  const float* zp = zt.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) op[i * n + j] = zp[j * rows + i] + bp[j];
}

// out[j] = the sum of the contiguous matrix g's column j, row after row (a bias's gradient; an ATen sum costs more
// in overhead than the 3,200 additions of a 32 x 100 batch).
void column_sums(at::Tensor& out, const at::Tensor& g) {
  TORCH_CHECK(out.is_contiguous() && g.is_contiguous() && out.numel() == g.size(1), "dnnlab: contiguous gradients");
  const int64_t rows = g.size(0), n = g.size(1);
  const float* gp = g.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  std::copy(gp, gp + n, op);
  for (int64_t i = 1; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) op[j] += gp[i * n + j];
}

// Forward pass, mean cross-entropy and backward pass of the batch x (B x features) with labels y, the gradients
// written into the Layers' gradient tensors. masks[l]: the scaled dropout mask of layer l's input, or undefined.
double run(const at::Tensor& x, const at::Tensor& y, const Layers& net, Act act, at::ArrayRef<double> act_args,
           const std::vector<at::Tensor>& masks, int64_t& hits) {
  const int64_t L = net.kernels.size();
  const bool t = net.in_by_out;
  // inputs[l]: what layer l multiplies (after dropout); pre[l], post[l]: hidden layer l's z and act(z)
  std::vector<at::Tensor> inputs(L), pre(L), post(L);
  at::Tensor h = x;
  for (int64_t l = 0; l < L; ++l) {
    if (masks[l].defined()) h = at::mul(h, masks[l]);
    inputs[l] = h;
    pre[l] = at::empty({h.size(0), net.biases[l].size(0)}, h.options());
    if (t) {
      rows_of(pre[l], net.biases[l]);  // the bias in every row, then += the product, as addmm computes it
      matmul(pre[l], h, false, net.kernels[l], false, true);
    } else {  // MKL's kernels for W @ h^T beat those for h @ W^T, the transposition included (41 against 59 us)
      at::Tensor zt = at::empty({pre[l].size(1), pre[l].size(0)}, h.options());
      matmul(zt, net.kernels[l], false, h, true, false);
      transpose_plus(pre[l], zt, net.biases[l]);
    }
    if (l < L - 1) h = post[l] = forward(act, pre[l], act_args);
  }

  at::Tensor g = at::empty_like(pre[L - 1]);
  const double loss = cross_entropy(pre[L - 1], y, g, hits);

  for (int64_t l = L - 1; l >= net.first; --l) {
    at::Tensor gw = net.kernel_grads[l - net.first], gb = net.bias_grads[l - net.first];
    if (t)
      matmul(gw, inputs[l], true, g, false, false);
    else
      matmul(gw, g, true, inputs[l], false, false);
    column_sums(gb, g);
    if (l == net.first) break;
    at::Tensor gh = at::empty({g.size(0), net.kernels[l].size(t ? 0 : 1)}, g.options());
    matmul(gh, g, false, net.kernels[l], t, false);
    if (masks[l].defined()) gh = at::mul(gh, masks[l]);
    g = backward(act, gh, pre[l - 1], post[l - 1], act_args);
  }
  return loss;
}

// Adam's (or AdamW's) hyperparameters for one update, from the optimizer's param_groups.
struct Adam {
  double lr, beta1, beta2, weight_decay, eps;
  bool decoupled, maximize;
};

// torch's own fused kernel on (views of) flat tensors, the step already counted in `step`.
void torch_adam(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& step, const Adam& a) {
  if (a.decoupled)
    at::_fused_adamw_({param}, {grad}, {exp_avg}, {exp_avg_sq}, {}, {step}, a.lr, a.beta1, a.beta2, a.weight_decay,
                      a.eps, false, a.maximize);
  else
    at::_fused_adam_({param}, {grad}, {exp_avg}, {exp_avg_sq}, {}, {step}, a.lr, a.beta1, a.beta2, a.weight_decay,
                     a.eps, false, a.maximize);
}

// The update of n elements (a multiple of 16) with torch's vectorised arithmetic (ATen's FusedAdamKernel.cpp for
// float32 without amsgrad or a gradient scale), operation for operation, the fused multiply-adds where torch's
// AVX-512 build has them.
__attribute__((target("avx512f"))) void adam_avx512(float* p, float* m, float* v, const float* gr, int64_t n,
                                                    const Adam& a, double step) {
  const float c1 = 1 - a.beta1, c2 = 1 - a.beta2, bc2 = std::sqrt(1 - std::pow(a.beta2, step));
  const bool small = std::abs(c1) < 0.5f;  // torch's lerp: m + w (g - m) for a small weight, else g + (w - 1)(g - m)
  const __m512 W = _mm512_set1_ps(small ? c1 : c1 - 1.0f), C2 = _mm512_set1_ps(c2),
               B2 = _mm512_set1_ps(static_cast<float>(a.beta2)), BC2 = _mm512_set1_ps(bc2),
               EPS = _mm512_set1_ps(static_cast<float>(a.eps)), WD = _mm512_set1_ps(static_cast<float>(a.weight_decay)),
               SHRINK = _mm512_set1_ps(static_cast<float>(1 - a.lr * a.weight_decay)),
               NSS = _mm512_set1_ps(static_cast<float>(-(a.lr / (1 - std::pow(a.beta1, step)))));
  for (int64_t d = 0; d < n; d += 16) {
    __m512 pv = _mm512_loadu_ps(p + d), g = _mm512_loadu_ps(gr + d);
    if (a.maximize) g = _mm512_mul_ps(g, _mm512_set1_ps(-1.0f));
    if (a.weight_decay != 0) {
      if (a.decoupled)
        pv = _mm512_mul_ps(pv, SHRINK);
      else
        g = _mm512_fmadd_ps(pv, WD, g);
    }
    const __m512 mo = _mm512_loadu_ps(m + d);
    const __m512 mv = _mm512_fmadd_ps(W, _mm512_sub_ps(g, mo), small ? mo : g);
    const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(C2, g), g, _mm512_mul_ps(_mm512_loadu_ps(v + d), B2));
    _mm512_storeu_ps(m + d, mv);
    _mm512_storeu_ps(v + d, vv);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), BC2), EPS);
    _mm512_storeu_ps(p + d, _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(NSS, mv), denom)));
  }
}

// update = [params, grads, exp_avg, exp_avg_sq, steps]: flat tensors of `size` elements each (a stack's: one
// job's range after another) and step counters (each counts one more step here). Returns the new step.
double count_step(at::TensorList update, int64_t size) {
  TORCH_CHECK(update.size() == 5, "dnnlab: update is [params, grads, exp_avg, exp_avg_sq, steps]");
  for (int64_t i = 0; i < 4; ++i)
    TORCH_CHECK(update[i].scalar_type() == at::kFloat && update[i].is_contiguous() && update[i].dim() == 1 &&
                    update[i].numel() == size,
                "dnnlab: the update's flat tensors are contiguous float32 tensors of ", size, " elements");
  const at::Tensor& steps = update[4];
  TORCH_CHECK(steps.scalar_type() == at::kFloat && steps.is_contiguous() && steps.numel() > 0,
              "dnnlab: float32 step counters");
  float* counts = steps.mutable_data_ptr<float>();
  for (int64_t k = 0; k < steps.numel(); ++k) counts[k] += 1;
  return counts[0];
}

// The update of elements [begin, end) of the flat tensors. The whole 16-float cache lines are split between
// `threads` threads (so the numbers do not depend on the thread count); the last few elements go to torch's kernel,
// whose scalar loop's arithmetic depends on how torch was compiled (as does everything without AVX-512).
void adam_range(at::TensorList update, int64_t begin, int64_t end, double step, const Adam& a, int64_t threads) {
  const int64_t lines = __builtin_cpu_supports("avx512f") ? (end - begin) / 16 : 0, rest = begin + lines * 16;
  if (rest < end) {
    const auto tail = [&](int64_t i) { return update[i].slice(0, rest, end); };
    torch_adam(tail(0), tail(1), tail(2), tail(3), update[4].view(-1).select(0, 0), a);
  }
  if (lines == 0) return;
  float *p = update[0].mutable_data_ptr<float>() + begin, *m = update[2].mutable_data_ptr<float>() + begin,
        *v = update[3].mutable_data_ptr<float>() + begin;
  const float* g = update[1].const_data_ptr<float>() + begin;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min(threads, lines)));
  if (parts == 1) return adam_avx512(p, m, v, g, lines * 16, a, step);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int part = 0; part < parts; ++part) {
    const int64_t first = lines * part / parts * 16, last = lines * (part + 1) / parts * 16;
    adam_avx512(p + first, m + first, v + first, g + first, last - first, a, step);
  }
}

// adam: lr, beta1, beta2, weight_decay, eps, decoupled (AdamW), maximize, from `at` on.
Adam hyperparameters(at::ArrayRef<double> adam, size_t at) {
  TORCH_CHECK(adam.size() >= at + 7, "dnnlab: Adam's lr, beta1, beta2, weight_decay, eps, decoupled, maximize");
  return {adam[at], adam[at + 1], adam[at + 2], adam[at + 3], adam[at + 4], adam[at + 5] != 0, adam[at + 6] != 0};
}

// The same float32 arithmetic as `loss_sum += loss * len(y)` in the autograd path.
void accumulate(float* loss_sum, int64_t* correct, double loss, int64_t batch, int64_t hits) {
  *loss_sum += static_cast<float>(loss) * static_cast<float>(batch);
  *correct += hits;
}

void check_inputs(const at::Tensor& x_all, const at::Tensor& y_all, const at::Tensor& loss_sum,
                  const at::Tensor& correct) {
  TORCH_CHECK(x_all.device().is_cpu() && x_all.scalar_type() == at::kFloat && y_all.scalar_type() == at::kLong,
              "dnnlab: float32 inputs and int64 labels on the CPU");
  TORCH_CHECK(loss_sum.scalar_type() == at::kFloat && loss_sum.is_contiguous() &&
                  correct.scalar_type() == at::kLong && correct.is_contiguous(),
              "dnnlab: a contiguous float32 loss sum and int64 count of hits");
}

// weights, biases: every Linear layer's (out x in) kernel and bias, bottom to top; the gradient lists hold the
// layers from `first_trainable` up. dropout[l]: the rate applied to layer l's input (0: none), its mask drawn from
// the default generator as torch.nn.functional.dropout draws it on the CPU (bernoulli_(1 - p), divided by 1 - p),
// so a seed draws the same masks as in the autograd path. Adds the batch's summed loss and its hits to loss_sum
// and correct, as the autograd path's accumulation does. With a non-empty `update` (see count_step; adam: see
// hyperparameters), the optimizer's update follows the backward pass, on
// `threads` threads (the products run on one). Returns the batch's mean loss and the update's seconds (0 without),
// which dnnlab's thread chooser times.
std::tuple<double, double> mlp_step(const at::Tensor& x_all, const at::Tensor& y_all, const at::Tensor& idx,
                                    at::TensorList weights, at::TensorList biases, at::TensorList weight_grads,
                                    at::TensorList bias_grads, int64_t first_trainable, c10::string_view activation,
                                    at::ArrayRef<double> act_args, at::ArrayRef<double> dropout, at::Tensor loss_sum,
                                    at::Tensor correct, at::TensorList update, at::ArrayRef<double> adam,
                                    int64_t threads) {
  const int64_t L = weights.size();
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(dropout.size()) == L,
              "dnnlab::mlp_step: one bias and one dropout rate per layer");
  TORCH_CHECK(first_trainable >= 0 && first_trainable < L &&
                  static_cast<int64_t>(weight_grads.size()) == L - first_trainable &&
                  static_cast<int64_t>(bias_grads.size()) == L - first_trainable,
              "dnnlab::mlp_step: one gradient tensor per trainable layer");
  check_inputs(x_all, y_all, loss_sum, correct);
  const Act act = parse(activation);

  at::Tensor x = at::index_select(x_all, 0, idx);
  x = x.view({x.size(0), -1});
  const at::Tensor y = at::index_select(y_all, 0, idx);
  const int64_t B = x.size(0);
  Layers net{weights.vec(), biases.vec(), weight_grads.vec(), bias_grads.vec(), first_trainable, false};
  std::vector<at::Tensor> masks(L);
  for (int64_t l = 0; l < L; ++l)  // drawn in the order the autograd path draws them: bottom to top
    if (dropout[l] > 0)
      masks[l] = at::empty({B, weights[l].size(1)}, x.options()).bernoulli_(1 - dropout[l]).div_(1 - dropout[l]);

  int64_t hits = 0;
  const double loss = run(x, y, net, act, act_args, masks, hits);
  accumulate(loss_sum.mutable_data_ptr<float>(), correct.mutable_data_ptr<int64_t>(), loss, B, hits);
  if (update.empty()) return {loss, 0.0};
  const auto start = std::chrono::steady_clock::now();
  const int64_t n = update[0].numel();
  adam_range(update, 0, n, count_step(update, n), hyperparameters(adam, 0), threads);
  return {loss, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
}

// The step of a stack of J networks of one shape (dnnlab/stacked.py): job k trains on x_all[idx[k]] with its slices
// weights[l][k] (in x out), biases[l][k] and gradients, and masks[l][k] (J x B x in, or None: no dropout at layer l
// for any job; drawn by the caller from each job's own generator). The jobs are independent, so they are spread
// over the intra-op threads, each job's step (and its optimizer's update, with `update`) running on one thread with
// the kernels a single job uses. Adds each job's summed loss and hits to loss_sum[k] and correct[k]; returns the
// jobs' mean losses.
std::vector<double> stack_step(const at::Tensor& x_all, const at::Tensor& y_all, const at::Tensor& idx,
                               at::TensorList weights, at::TensorList biases, at::TensorList weight_grads,
                               at::TensorList bias_grads, c10::string_view activation, at::ArrayRef<double> act_args,
                               const c10::List<std::optional<at::Tensor>>& masks, at::Tensor loss_sum,
                               at::Tensor correct, at::TensorList update, at::ArrayRef<double> adam) {
  const int64_t L = weights.size(), J = idx.size(0);
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(weight_grads.size()) == L &&
                  static_cast<int64_t>(bias_grads.size()) == L && static_cast<int64_t>(masks.size()) == L,
              "dnnlab::stack_step: per layer one weight, bias, gradient of each and mask (or None)");
  TORCH_CHECK(idx.dim() == 2 && loss_sum.numel() == J && correct.numel() == J,
              "dnnlab::stack_step: idx is jobs x batch, one loss sum and hit count per job");
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(weights[l].dim() == 3 && weights[l].size(0) == J && weight_grads[l].sizes() == weights[l].sizes() &&
                    bias_grads[l].sizes() == biases[l].sizes(),
                "dnnlab::stack_step: layer ", l, ": stacked (jobs x in x out) weights and gradients");
  check_inputs(x_all, y_all, loss_sum, correct);
  const Act act = parse(activation);

  // With `update` (see count_step; the flat tensors hold the jobs' ranges one after another, and adam holds 7
  // hyperparameters per job), each job's Adam update follows its backward pass, on its thread.
  double step = 0;
  int64_t per_job = 0;
  if (!update.empty()) {
    for (int64_t l = 0; l < L; ++l) per_job += weights[l].size(1) * weights[l].size(2) + biases[l].size(1);
    step = count_step(update, per_job * J);
    TORCH_CHECK(static_cast<int64_t>(adam.size()) == 7 * J, "dnnlab::stack_step: 7 hyperparameters per job");
  }
  std::vector<double> losses(J);
  float* sums = loss_sum.mutable_data_ptr<float>();
  int64_t* hit_counts = correct.mutable_data_ptr<int64_t>();
  // Jobs handed out one at a time, not in fixed shares: a thread slowed down by another program (a core shared with
  // other tenants) then does fewer jobs rather than hold the whole step up. Which thread runs a job does not change
  // its numbers.
  std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(at::get_num_threads(), J)))
  {
    const OneMklThread one_mkl_thread;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < J; ++k) {
      try {
        Layers net{{}, {}, {}, {}, 0, true};
        std::vector<at::Tensor> job_masks(L);
        for (int64_t l = 0; l < L; ++l) {
          net.kernels.push_back(weights[l].select(0, k));
          net.biases.push_back(biases[l].select(0, k));
          net.kernel_grads.push_back(weight_grads[l].select(0, k));
          net.bias_grads.push_back(bias_grads[l].select(0, k));
          const std::optional<at::Tensor> mask = masks[l];
          if (mask.has_value()) job_masks[l] = mask->select(0, k);
        }
        const at::Tensor rows = idx.select(0, k);
        const at::Tensor x = at::index_select(x_all, 0, rows);
        int64_t hits = 0;
        losses[k] = run(x.view({x.size(0), -1}), at::index_select(y_all, 0, rows), net, act, act_args, job_masks,
                        hits);
        accumulate(sums + k, hit_counts + k, losses[k], rows.size(0), hits);
        if (per_job) adam_range(update, k * per_job, (k + 1) * per_job, step, hyperparameters(adam, 7 * k), 1);
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  return losses;
}

}  // namespace

TORCH_LIBRARY(dnnlab, m) {
  m.def("mlp_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor[] weights, Tensor[] biases, "
        "Tensor(a!)[] weight_grads, Tensor(b!)[] bias_grads, int first_trainable, str activation, "
        "float[] act_args, float[] dropout, Tensor(c!) loss_sum, Tensor(d!) correct, Tensor(e!)[] update, "
        "float[] adam, int threads) -> (float, float)");
  m.def("stack_step(Tensor x_all, Tensor y_all, Tensor idx, Tensor[] weights, Tensor[] biases, "
        "Tensor(a!)[] weight_grads, Tensor(b!)[] bias_grads, str activation, float[] act_args, Tensor?[] masks, "
        "Tensor(c!) loss_sum, Tensor(d!) correct, Tensor(e!)[] update, float[] adam) -> float[]");
  m.impl("mlp_step", c10::DispatchKey::CPU, &mlp_step);
  m.impl("stack_step", c10::DispatchKey::CPU, &stack_step);
}
