// A test run once per device: "cpu", and "cuda" where a GPU is visible and
// aq was built with its CUDA kernels (skipped otherwise).
#pragma once

#include "aq/compress.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

class DeviceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "cuda" && (!torch::cuda::is_available() || !aq::built_with_cuda()))
      GTEST_SKIP() << "no CUDA device or built without CUDA";
    torch::manual_seed(1234);
  }
  torch::Device dev() const { return torch::Device(GetParam()); }
  torch::TensorOptions opts(torch::Dtype dt = torch::kFloat) const {
    return torch::TensorOptions().dtype(dt).device(dev());
  }
};

#define AQ_PER_DEVICE(Suite)                                                              \
  INSTANTIATE_TEST_SUITE_P(Device, Suite, ::testing::Values("cpu", "cuda"),               \
                           [](const auto& info) { return std::string(info.param); })

// Deterministic cuDNN for comparisons of two computations, restored after.
struct DeterministicCudnn {
  bool det = at::globalContext().deterministicCuDNN(), bench = at::globalContext().benchmarkCuDNN();
  DeterministicCudnn() {
    at::globalContext().setDeterministicCuDNN(true);
    at::globalContext().setBenchmarkCuDNN(false);
  }
  ~DeterministicCudnn() {
    at::globalContext().setDeterministicCuDNN(det);
    at::globalContext().setBenchmarkCuDNN(bench);
  }
};
