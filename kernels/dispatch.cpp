// The one place a missing backend's message is written (see dispatch.h).
#include "dispatch.h"

#include "aq_config.h"

#include <stdexcept>
#include <string>

namespace aq::kernels {

void no_implementation(const char* op, c10::DeviceType device) {
  std::string what = std::string("aq: ") + op + ": no " + c10::DeviceTypeName(device) + " implementation";
  if (device == c10::kCUDA && !AQ_WITH_CUDA) what += " in this build (built without CUDA)";
  throw std::runtime_error(what);
}

}  // namespace aq::kernels
