#include "aq/config.h"

#include <algorithm>
#include <cctype>
#include <sstream>
#include <utility>
#include <vector>
#include <stdexcept>

namespace aq {
namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

const char* tf(bool b) { return b ? "True" : "False"; }

}  // namespace

Level parse_level(const std::string& s) {
  std::string t = lower(s);
  if (!t.empty() && t[0] == 'l') t = t.substr(1);
  if (t == "0") return Level::L0;
  if (t == "1") return Level::L1;
  if (t == "2") return Level::L2;
  if (t == "3") return Level::L3;
  if (t == "3.1") return Level::L3_1;
  if (t == "4") return Level::L4;
  if (t == "5") return Level::L5;
  bad("unknown optimisation level '" + s + "' (use L0, L1, L2, L3, L3.1, L4 or L5)");
}

std::string to_string(Level level) {
  switch (level) {
    case Level::L0: return "L0";
    case Level::L1: return "L1";
    case Level::L2: return "L2";
    case Level::L3: return "L3";
    case Level::L3_1: return "L3.1";
    case Level::L4: return "L4";
    case Level::L5: return "L5";
  }
  return "?";
}

Scope parse_scope(const std::string& s) {
  const std::string t = lower(s);
  if (t == "fanin") return Scope::kNone;
  if (t == "quantize") return Scope::kAll;
  if (t == "qlinear") return Scope::kLinear;
  if (t == "qsyncbn") return Scope::kSyncBN;
  bad("unknown configuration '-c " + s + "' (use fanin, quantize, qlinear or qsyncbn)");
}

std::string to_string(Scope scope) {
  switch (scope) {
    case Scope::kNone: return "fanin";
    case Scope::kAll: return "quantize";
    case Scope::kLinear: return "qlinear";
    case Scope::kSyncBN: return "qsyncbn";
  }
  return "?";
}

bool parse_bool(const std::string& s) {
  const std::string t = lower(s);
  if (t == "true" || t == "1" || t == "yes" || t == "on") return true;
  if (t == "false" || t == "0" || t == "no" || t == "off") return false;
  bad("'" + s + "' is not a boolean (use True or False)");
}

QuantConfig QuantConfig::for_level(Level level) {
  QuantConfig c;
  c.level = level;
  // L0-L2 keep every layer at one setting; L3 and up give attention 8 bits.
  if (level == Level::L0 || level == Level::L1 || level == Level::L2) c.attention_bits = 0;
  switch (level) {
    case Level::L0:  // nothing compressed; masks and pool indices stay compact
      c.ca = false;
      c.cabits = c.ibits = 8;
      c.perlayer = false;
      break;
    case Level::L1:  // 4-bit per-group conv/linear inputs, exact BatchNorm
      c.cabits = c.ibits = 4;
      c.perlayer = false;
      c.compress_bn = false;
      break;
    case Level::L2:  // 4-bit per-group everywhere
      c.cabits = c.ibits = 4;
      c.perlayer = false;
      break;
    case Level::L5:
      c.defrag = true;
      [[fallthrough]];
    case Level::L4:
      c.swap = true;
      [[fallthrough]];
    case Level::L3_1:  // memory-saving backward (L4 is L3.1 + swap, as in ActNN)
      c.micro_batch_backward = true;
      [[fallthrough]];
    case Level::L3:  // 2-bit budget, per-group, per-sample and per-layer, from 8 bits
      c.cabits = 2;
      c.ibits = 8;
      break;
  }
  return c;
}

QuantConfig QuantConfig::for_model(bool transformer) const {
  QuantConfig c = *this;
  if (transformer && !cabits_given && compresses() && level >= Level::L3)
    c.cabits = std::min(kTransformerCabits, ibits);
  return c;
}

void QuantConfig::validate() const {
  if (cabits < 1 || cabits > 8) bad("--cabits must be in 1..8, not " + std::to_string(cabits));
  if (ibits < 1 || ibits > 8) bad("--ibits must be in 1..8, not " + std::to_string(ibits));
  if (ibits < cabits)
    bad("--ibits (" + std::to_string(ibits) + ") must be at least --cabits (" + std::to_string(cabits) +
        "): bits are only ever taken away from the initial allocation");
  if (attention_bits < 0 || attention_bits > 8)
    bad("--attention-bits must be in 0..8, not " + std::to_string(attention_bits));
  if (group_size < kMinGroupSize || group_size > kMaxGroupSize || (group_size & (group_size - 1)) != 0)
    bad("--group-size must be a power of two from 32 to 2^20, not " + std::to_string(group_size));
  if (range_dtype != c10::kFloat && range_dtype != c10::kBFloat16)
    bad("--range-dtype must be fp32 or bf16");
}

std::string QuantConfig::to_flags() const {
  std::string s = "-c " + to_string(scope) + " --ca=" + tf(ca) + " --cabits=" + std::to_string(cabits) +
                  " --ibits=" + std::to_string(ibits) + " --pergroup=" + tf(pergroup) + " --perlayer=" +
                  tf(perlayer) + " --usegradient=" + tf(usegradient) + " --level " + to_string(level);
  if (group_size != 256) s += " --group-size " + std::to_string(group_size);
  if (attention_bits != for_level(level).attention_bits) s += " --attention-bits " + std::to_string(attention_bits);
  if (range_dtype == c10::kFloat) s += " --range-dtype fp32";
  if (!stochastic) s += " --rounding nearest";
  return s;
}

QuantConfig QuantConfig::from_flags(const std::string& flags) {
  std::vector<std::pair<std::string, std::string>> kv;  // flag, value
  std::istringstream in(flags);
  std::string tok;
  while (in >> tok) {
    const auto eq = tok.find('=');
    if (eq != std::string::npos) {
      kv.emplace_back(tok.substr(0, eq), tok.substr(eq + 1));
    } else {
      std::string value;
      if (!(in >> value)) bad("configuration '" + flags + "': " + tok + " has no value");
      kv.emplace_back(tok, value);
    }
  }
  Level level = Level::L3;
  for (const auto& [k, v] : kv)
    if (k == "--level") level = parse_level(v);
  QuantConfig c = for_level(level);
  for (const auto& [k, v] : kv) {
    if (k == "-c" || k == "--qconfig") c.scope = parse_scope(v);
    else if (k == "--ca") c.ca = parse_bool(v);
    else if (k == "--cabits") c.cabits = parse_int(k, v), c.cabits_given = true;
    else if (k == "--ibits") c.ibits = parse_int(k, v);
    else if (k == "--pergroup") c.pergroup = parse_bool(v);
    else if (k == "--perlayer") c.perlayer = parse_bool(v);
    else if (k == "--usegradient") c.usegradient = parse_bool(v);
    else if (k == "--group-size") c.group_size = parse_int(k, v);
    else if (k == "--attention-bits") c.attention_bits = parse_int(k, v);
    else if (k == "--range-dtype") c.range_dtype = parse_range_dtype(v);
    else if (k == "--rounding") c.stochastic = parse_rounding(v);
    else if (k != "--level") bad("configuration '" + flags + "': unknown flag " + k);
  }
  c.validate();
  return c;
}

int parse_int(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  int v = 0;
  try {
    v = std::stoi(s, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != s.size()) bad(flag + ": '" + s + "' is not an integer");
  return v;
}

c10::ScalarType parse_range_dtype(const std::string& s) {
  const std::string r = lower(s);
  if (r == "bf16" || r == "bfloat16") return c10::kBFloat16;
  if (r == "fp32" || r == "float32") return c10::kFloat;
  bad("--range-dtype must be bf16 or fp32, not '" + s + "'");
}

bool parse_rounding(const std::string& s) {
  const std::string r = lower(s);
  if (r != "stochastic" && r != "nearest") bad("--rounding must be stochastic or nearest, not '" + s + "'");
  return r == "stochastic";
}

}  // namespace aq
