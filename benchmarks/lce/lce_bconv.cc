// One binary conv layer through Larq Compute Engine's optimised aarch64 indirect BGEMM
// kernels (vendor/, unchanged), run `loops` times: the cycle model runs it with 0 and R
// loops and differences them (abc_tvm.bench.cycle_model.process_estimate), so setup
// (weight packing, the indirection buffer) cancels and one layer call is left.
//
//   lce_bconv C H W O K STRIDE LOOPS     (NHWC, batch 1, 'same' zero padding, float output)
//
// Kernel choice as LCE's select_kernel.h (8x4x4 / 8x4x2 / 8x4x1 by the bitpacked depth,
// Depth2OrMore when it exceeds the block) except for its 16-bit accumulator check: LCE tests
// 32 * (the whole input's size) < 65535, which sends every layer of a 224² ResNet to its
// portable C++ kernel; the accumulators hold one output's sum, K*K*C < 65535, which is
// what is checked here, so these rows are LCE's assembly kernels.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "larq_compute_engine/core/indirect_bgemm/kernel_8x4x1_aarch64.h"
#include "larq_compute_engine/core/indirect_bgemm/kernel_8x4x2_aarch64.h"
#include "larq_compute_engine/core/indirect_bgemm/kernel_8x4x4_aarch64.h"

using namespace compute_engine::core;  // NOLINT
using indirect_bgemm::Kernel;

template <template <typename, bool, bool> class K>
std::unique_ptr<Kernel> make(bool deep, const bconv2d::BConv2DParams* p,
                             const RuntimeShape& in, const RuntimeShape& out,
                             const bconv2d::OutputTransform<float>& t) {
  if (deep) return std::make_unique<K<float, true, false>>(p, in, out, t);
  return std::make_unique<K<float, false, false>>(p, in, out, t);
}

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: lce_bconv C H W O K STRIDE LOOPS\n");
    return 2;
  }
  const int C = std::atoi(argv[1]), H = std::atoi(argv[2]), W = std::atoi(argv[3]);
  const int O = std::atoi(argv[4]), K = std::atoi(argv[5]), S = std::atoi(argv[6]);
  const int loops = std::atoi(argv[7]);
  const int depth = (C + 31) / 32;  // 32-bit words per pixel
  if (K * K * depth * 32 >= 65535) {
    std::fprintf(stderr, "lce_bconv: K*K*C too deep for 16-bit accumulators\n");
    return 2;
  }
  const int OH = (H + S - 1) / S, OW = (W + S - 1) / S;
  const int pad = ((OH - 1) * S + K - H) / 2;
  bconv2d::BConv2DParams p{};
  p.filter_width = p.filter_height = K;
  p.channels_in = C;
  p.channels_out = O;
  p.groups = 1;
  p.stride_height = p.stride_width = S;
  p.dilation_height_factor = p.dilation_width_factor = 1;
  p.padding_type = kTfLitePaddingSame;
  p.padding_values.height = p.padding_values.width = pad;
  p.pad_value = 0;
  const RuntimeShape in{1, H, W, depth}, out{1, OH, OW, O};

  std::vector<TBitpacked> input(H * W * depth + LCE_EXTRA_BYTES), weights(O * K * K * depth);
  unsigned s = 12345;
  for (auto& v : input) v = static_cast<TBitpacked>(s = s * 1103515245u + 12345u);
  for (auto& v : weights) v = static_cast<TBitpacked>(s = s * 1103515245u + 12345u);
  std::vector<float> mul(O, 0.5f), bias(O, 0.25f), y(OH * OW * O + 64);
  bconv2d::OutputTransform<float> t;
  t.multiplier = mul.data();
  t.bias = bias.data();

  std::unique_ptr<Kernel> k;
  if (depth % 4 == 0) {
    k = make<indirect_bgemm::Kernel8x4x4Aarch64>(depth > 4, &p, in, out, t);
  } else if (depth % 2 == 0) {
    k = make<indirect_bgemm::Kernel8x4x2Aarch64>(depth > 2, &p, in, out, t);
  } else {
    k = make<indirect_bgemm::Kernel8x4x1Aarch64>(depth > 1, &p, in, out, t);
  }
  k->PackWeights(weights.data());
  k->FillIndirectionBuffer(&p, in, out, input.data());
  for (int i = 0; i < loops; ++i) k->Dispatch(y.data());
  double sum = 0;
  for (float v : y) sum += v;
  std::printf("%d loops, checksum %.1f\n", loops, sum);
  return 0;
}
