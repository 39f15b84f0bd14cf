// aq-export: writes a checkpoint's weights (parameters and buffers, by
// torchvision's names where the model is torchvision's) as a safetensors
// file, with the metadata that rebuilds the model.  See aq-export(1).
#include "aq/checkpoint.h"
#include "aq/cli.h"
#include "aq/safetensors.h"
#include "aq/weights.h"

#include <stdexcept>
#include <string>

int main(int argc, char** argv) {
  CLI::App app{"aq-export: a checkpoint's weights as a safetensors file (for PyTorch, torchvision and aq-train)",
               "aq-export"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  aq::cli::Values defaults;
  aq::cli::OptionTable table(app, 0, defaults);
  std::string checkpoint, output;
  bool force = false;
  app.add_option("checkpoint", checkpoint, "HDF5 checkpoint written by aq-train ('-': standard input)")->required();
  app.add_option("-o,--output", output, "safetensors file to write ('-': standard output)")->required();
  app.add_flag("-f,--force", force, "Replace the output file if it exists (else refused, exit 2)");
  return aq::cli::run(app, argc, argv, [&]() -> int {
    table.apply_common();
    aq::cli::refuse_existing(output, force);
    const auto w = aq::train::export_weights(aq::ckpt::load(checkpoint), checkpoint == "-" ? "standard input" : checkpoint);
    aq::safetensors::save(output, w.tensors, w.metadata, force);
    return aq::cli::kOk;
  });
}
