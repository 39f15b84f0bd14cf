// ActNN's "Using the library", in C++: build a model from aq's layers (or
// convert a torch::nn::Sequential), turn compression on with QModule, and
// train as usual.  Prints one TSV line per step: step, loss, bytes the
// layers kept for backward.
//
//   build/examples/aq-example-library [steps]
#include <aq/config.h>
#include <aq/modules.h>

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

struct MyModelImpl : torch::nn::Module {
  // Replace Conv2d, BatchNorm2d, ReLU and Linear by their Q twins.
  aq::QConv2d conv{torch::nn::Conv2dOptions(1, 16, 3).padding(1)};
  aq::QBatchNorm2d bn{torch::nn::BatchNormOptions(16)};
  aq::QReLU relu;
  aq::QMaxPool2d pool{torch::nn::MaxPool2dOptions(2)};
  aq::QLinear linear{torch::nn::LinearOptions(16 * 14 * 14, 10)};

  MyModelImpl() {
    register_module("conv", conv);
    register_module("bn", bn);
    register_module("relu", relu);
    register_module("pool", pool);
    register_module("linear", linear);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return linear(pool(relu(bn(conv(x)))).flatten(1));
  }
};
TORCH_MODULE(MyModel);

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 20;
  torch::manual_seed(0);
  MyModel model;
  // "Convert the model to a QModule before using": 2 bits per activation.
  aq::QuantConfig config = aq::QuantConfig::for_level(aq::Level::L3);
  config.ibits = config.cabits;  // uniform bits until the adaptive scheme runs
  const int64_t layers = aq::QModule(*model, config);
  std::fprintf(stderr, "aq-example-library: %lld aq layers, %s\n", static_cast<long long>(layers),
               config.to_flags().c_str());

  // A toy task: the class is which quadrant of a 28x28 image is brightest.
  auto x = torch::rand({64, 1, 28, 28});
  auto q = x.view({64, 1, 2, 14, 2, 14}).sum({1, 3, 5}).view({64, 4});
  auto y = q.argmax(1);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  std::printf("step\tloss\tsaved_bytes\n");
  for (int s = 1; s <= steps; ++s) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model(x), y);
    loss.backward();
    opt.step();
    const int64_t saved = model->conv->state()->saved_bytes + model->bn->state()->saved_bytes +
                          model->relu->state()->saved_bytes + model->pool->state()->saved_bytes +
                          model->linear->state()->saved_bytes;
    std::printf("%d\t%.5f\t%lld\n", s, loss.item<double>(), static_cast<long long>(saved));
  }
  return 0;
}
