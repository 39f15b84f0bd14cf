// The quantization configuration: what is compressed and how, in ActNN's
// terms (docs/design.md §5-6), shared by the library and every tool.
//
// Command lines use ActNN's spelling, e.g.
//   -c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True --usegradient=False
// and the optimisation levels L0..L5 (--level L3.1); a level sets defaults,
// flags given explicitly override them.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace aq {

// Optimisation levels of the original (docs/design.md §6).
enum class Level { L0, L1, L2, L3, L3_1, L4, L5 };

// Which layers a model conversion touches (ActNN's -c).
enum class Scope {
  kNone,      // fanin: the exact model, Kaiming fan-in initialisation
  kAll,       // quantize: every supported layer
  kLinear,    // qlinear: conv/linear inputs only; BatchNorm and ReLU stay exact
  kSyncBN,    // qsyncbn: as quantize with synchronised BatchNorm (distributed)
};

struct QuantConfig {
  Scope scope = Scope::kAll;
  Level level = Level::L3;
  bool ca = true;            // compress saved activations at all
  int cabits = 2;            // average bits per element (the budget)
  bool cabits_given = false; // cabits was given (a flag, a stored config), not the level's: see for_model()
  int ibits = 8;             // initial bits before reallocation (== cabits: uniform)
  bool pergroup = true;      // per-group ranges; false: one range per tensor
  bool perlayer = true;      // reallocate bits across layers, not only samples
  bool usegradient = true;   // per-sample gradient statistics in the sensitivity
  bool compress_bn = true;   // BatchNorm inputs compressed (L1: false)
  int64_t group_size = 256;  // elements per group, power of two 32..2^20
  // Self-attention's q, k, v at this many bits per group, uniform (0: the
  // bits every layer gets, as L0-L2 have it).  Its gradient is not linear
  // in them, and at 2 bits visibly biased (docs/design.md §4).
  int attention_bits = 8;
  bool stochastic = true;    // stochastic rounding (false: nearest, biased)
  c10::ScalarType range_dtype = c10::kBFloat16;  // storage of group bounds
  bool micro_batch_backward = false;  // L3.1, L4, L5: inputs restored in micro-batches in backward
  int64_t micro_batch_bytes = 256 << 20;  // restored input per micro-batch, at most
  bool swap = false;         // L4+: packed activations in pinned host memory (CUDA)
  bool defrag = false;       // L5: expandable segments in the CUDA caching allocator (set by QModule)

  // The defaults of a level (scope unchanged).
  static QuantConfig for_level(Level level);

  // This configuration for a model: on a transformer, the adaptive levels
  // (L3 and up) budget kTransformerCabits bits per element, at most ibits,
  // unless cabits was given or nothing is compressed.  At 2 bits the linear
  // layers' compressed inputs add enough gradient variance to slow a ViT's
  // training measurably (docs/transformers.md); 3 bits closes most of that
  // gap and still keeps under a quarter of the exact model's activations.
  QuantConfig for_model(bool transformer) const;
  static constexpr int kTransformerCabits = 3;
  static constexpr int64_t kMinGroupSize = 32, kMaxGroupSize = int64_t(1) << 20;

  // Throws std::invalid_argument naming the bad setting.
  void validate() const;

  // True when conversions should compress anything at all.
  bool compresses() const { return scope != Scope::kNone && ca && level != Level::L0; }

  // ActNN's spelling: "-c quantize --ca=True --cabits=2 ...", plus --level.
  std::string to_flags() const;
  // Back from what to_flags() writes (as checkpoints keep it): the level's
  // defaults with the flags applied.  Throws std::invalid_argument naming
  // what it cannot read.
  static QuantConfig from_flags(const std::string& flags);
};

// True when a configuration reallocates bits at all (adaptive precision).
inline bool adaptive(const QuantConfig& c) { return c.compresses() && c.ibits > c.cabits; }

// "L3", "l3", "3", "L3.1", "3.1": throws std::invalid_argument otherwise.
Level parse_level(const std::string& s);
std::string to_string(Level level);
// fanin, quantize, qlinear, qsyncbn.
Scope parse_scope(const std::string& s);
std::string to_string(Scope scope);
// True/False as ActNN writes them; also true/false, 1/0, yes/no, on/off.
bool parse_bool(const std::string& s);

// The configuration's values as the tools spell them; each throws
// std::invalid_argument naming the flag.
int parse_int(const std::string& flag, const std::string& s);
c10::ScalarType parse_range_dtype(const std::string& s);  // bf16, fp32
bool parse_rounding(const std::string& s);                 // stochastic: true, nearest: false

}  // namespace aq
