// How a kernel op reaches its implementation for a device type.
//
// Each op is declared once, in kernels/<op>.h, as a Kernel object: a named
// table of function pointers, one per device type.  Each backend's file
// fills its entry with AQ_REGISTER_KERNEL, so the library calls
// `kernels::quantize(x.device().type(), ...)` without knowing which backends
// this build has.  A CPU-only build has no CUDA files and no CUDA entries:
// calling a CUDA entry throws at run time, nothing fails to link.
//
// The table is filled while the shared library's static objects are
// initialized; it is complete before any caller can reach it.  A call is one
// load from the table and an indirect call: no lookup by name, no lock.
#pragma once

#include <c10/core/DeviceType.h>

#include <utility>

namespace aq::kernels {

// Throws std::runtime_error: "aq: <op>: no CUDA implementation in this build
// (built without CUDA)", or "aq: <op>: no <device> implementation".
[[noreturn]] void no_implementation(const char* op, c10::DeviceType device);

// An op whose implementations are functions of type Fn, R(Args...).
template <typename Fn>
class Kernel;

template <typename R, typename... Args>
class Kernel<R(Args...)> {
 public:
  using Fn = R(Args...);

  // constexpr, so that a namespace-scope Kernel is constant-initialized: it
  // exists, empty, before any registrar runs, whatever order the static
  // objects of the library are initialized in.
  constexpr explicit Kernel(const char* name) noexcept : name_(name) {}
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;

  const char* name() const noexcept { return name_; }

  // Registers fn for device; AQ_REGISTER_KERNEL calls it.
  void set(c10::DeviceType device, Fn* fn) noexcept { fns_[slot(device)] = fn; }

  // Whether this build has an implementation for device.  The library asks
  // it where it has a LibTorch path of its own for the other devices.
  bool has(c10::DeviceType device) const noexcept { return fns_[slot(device)] != nullptr; }

  // Runs the implementation for device; throws (no_implementation) if this
  // build has none.
  R operator()(c10::DeviceType device, Args... args) const {
    Fn* fn = fns_[slot(device)];
    if (fn == nullptr) no_implementation(name_, device);
    return fn(std::forward<Args>(args)...);
  }

 private:
  // Every value of c10::DeviceType has its slot: no bounds check per call.
  static constexpr int slot(c10::DeviceType device) noexcept { return static_cast<int>(device); }

  const char* name_;
  Fn* fns_[c10::COMPILE_TIME_MAX_DEVICE_TYPES] = {};
};

// What AQ_REGISTER_KERNEL defines: registers on construction.
template <typename K>
struct KernelRegistrar {
  KernelRegistrar(K& kernel, c10::DeviceType device, typename K::Fn* fn) noexcept { kernel.set(device, fn); }
};

}  // namespace aq::kernels

#define AQ_KERNEL_CONCAT_(a, b) a##b
#define AQ_KERNEL_NAME_(n) AQ_KERNEL_CONCAT_(aq_kernel_registrar_, n)

// In a backend's source file, at namespace scope:
//   AQ_REGISTER_KERNEL(quantize, c10::kCUDA, quantize_cuda);
// fn must have exactly the kernel's function type.  The registrar lives in a
// static library's object that nothing else refers to: libaq links the
// kernel libraries whole, or the linker would drop it.
#define AQ_REGISTER_KERNEL(kernel, device_type, fn) \
  static const ::aq::kernels::KernelRegistrar<decltype(kernel)> AQ_KERNEL_NAME_(__COUNTER__){kernel, device_type, fn}
