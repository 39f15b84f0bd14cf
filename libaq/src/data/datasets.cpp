// Dataset names and open(), which hands each name to its format's file.
#include "internal.h"

namespace aq::data {
using namespace detail;
namespace {

std::string canonical(const std::string& name) {
  const std::string n = lower(name);
  if (n == "fashion-mnist" || n == "fmnist" || n == "fashion_mnist") return "fashion-mnist";
  for (const std::string& known : names())
    if (n == known) return known;
  bad_arg("unknown dataset '" + name + "' (use fashion-mnist, mnist, cifar10, cifar100, imagenet, synthetic or text)");
}

}  // namespace

std::string resolve_name(const std::string& dataset, int64_t num_classes) {
  if ((dataset == "cifar10" || dataset == "cifar100") && num_classes == 100) return "cifar100";
  if (dataset == "cifar100" && num_classes == 10) return "cifar10";
  return dataset;
}

const std::vector<std::string>& names() {
  static const std::vector<std::string> all = {"fashion-mnist", "mnist",    "cifar10",
                                               "cifar100",      "imagenet", "synthetic", "text"};
  return all;
}

std::string default_root(const std::string& name) {
  return canonical(name) == "fashion-mnist" ? "/usr/share/datasets/fashion-mnist" : "";
}

std::shared_ptr<const Dataset> open(const std::string& name, const std::string& root, Split split,
                                    const OpenOptions& options) {
  const std::string n = canonical(name);
  if (options.image_size < 1) bad_arg("image size must be at least 1, not " + std::to_string(options.image_size));
  if (n == "synthetic") {
    if (options.synthetic_size < 1)
      bad_arg("synthetic: size must be at least 1, not " + std::to_string(options.synthetic_size));
    if (options.synthetic_classes < 1)
      bad_arg("synthetic: classes must be at least 1, not " + std::to_string(options.synthetic_classes));
    return open_synthetic(split, options);
  }
  const std::string dir = root.empty() ? default_root(n) : root;
  if (dir.empty()) bad_file(n + ": no dataset folder given; give the folder that holds its files");
  if (n == "fashion-mnist" || n == "mnist") return open_idx(n, dir, split);
  if (n == "cifar10" || n == "cifar100") return open_cifar(n, dir, split);
  if (n == "text") {
    if (options.context < 1) bad_arg("text: --context must be at least 1, not " + std::to_string(options.context));
    return open_text(dir, split, options.context);
  }
  return open_folder(dir, split, options.image_size);
}

}  // namespace aq::data
