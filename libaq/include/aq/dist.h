// Data-parallel runs over LibTorch's c10d: where a process stands among the
// ranks (from torchrun's or SLURM's environment), the process group (NCCL
// for CUDA tensors, Gloo for CPU tensors), the collectives aq needs, and
// gradients averaged in buckets while backward runs (c10d's Reducer, the
// engine of PyTorch's DistributedDataParallel).  docs/distributed.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace aq::dist {

// Where this process stands, as a launcher told it.
struct Env {
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;
  int master_port = 29500;
  std::string launcher;  // "torchrun" or "slurm"
};

// Reads a launcher's variables: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT) when RANK or WORLD_SIZE is set, else SLURM's
// srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
// SLURM_JOB_NODELIST, or MASTER_ADDR/MASTER_PORT where set) when
// SLURM_PROCID and SLURM_NTASKS are set and SLURM_NTASKS is more than 1.
// nullopt: none of them (one process, as without a launcher).  Throws
// std::invalid_argument naming the variable that is missing or bad.
// `get` reads a variable (null: unset); by default the process's.
using Getenv = std::function<const char*(const char*)>;
std::optional<Env> read_env(const Getenv& get = {});

// SLURM's compressed host list ("node[01-04,07],gpu3") expanded, in order;
// zero padding is kept.  Throws std::invalid_argument on a malformed list.
std::vector<std::string> expand_nodelist(const std::string& list);

// The group of all ranks.  Collectives run on tensors of the group's device
// (NCCL on CUDA, Gloo on the CPU) or on CPU tensors (Gloo, both cases), wait
// for their result, and throw std::runtime_error when a peer fails or the
// timeout passes.
class Group {
 public:
  ~Group();
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  const std::string& backend() const { return backend_; }  // of the device's tensors: "nccl" or "gloo"
  void all_reduce_sum(std::vector<at::Tensor>& tensors);
  void all_reduce_max(std::vector<at::Tensor>& tensors);
  void broadcast(std::vector<at::Tensor>& tensors, int64_t root = 0);
  // Every rank's `tensor` (the same shape on each), stacked along a new
  // first dimension in rank order.
  at::Tensor all_gather(const at::Tensor& tensor);
  void barrier();

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  friend std::shared_ptr<Group> connect(const Env&, const c10::Device&, std::chrono::milliseconds);
  Group() = default;
  std::unique_ptr<Impl> impl_;
  int64_t rank_ = 0, size_ = 1;
  std::string backend_;
};

// Rendezvous at env.master_addr:master_port (rank 0 listens there) and the
// process group for `device`'s tensors.  Throws std::runtime_error when the
// master cannot be reached within `timeout` (which also bounds every later
// collective), or when the build lacks the backend `device` needs.
std::shared_ptr<Group> connect(const Env& env, const c10::Device& device, std::chrono::milliseconds timeout);

// The process's group for layers whose forward has no argument to carry it
// (QSyncBatchNorm2d); null when the process runs alone.
void set_current(std::shared_ptr<Group> group);
std::shared_ptr<Group> current();

// Gradients of `params` averaged over the group during backward: buckets of
// about `bucket_mb` MiB (the last parameters first, as backward reaches
// them) are all-reduced as soon as all their gradients are ready, while
// backward goes on; when backward returns, every parameter's grad holds the
// mean over the ranks.  Every parameter must receive a gradient each step.
class GradientReducer {
 public:
  GradientReducer(Group& group, std::vector<at::Tensor> params, int64_t bucket_mb = 25);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;
  // Before each backward (after the forward that produced `output`).
  void prepare(const at::Tensor& output);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Parameters and buffers made rank 0's on every rank.
void broadcast_from_root(Group& group, std::vector<at::Tensor> tensors);

}  // namespace aq::dist
