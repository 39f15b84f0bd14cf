// pack_bits and unpack_bits: small integer codes (masks, window argmax
// indices) as a bit stream (docs/design.md §3).  Both backends, same bytes.
#pragma once

#include "dispatch.h"

#include <ATen/core/Tensor.h>

namespace aq::kernels {

// codes (bool/uint8/int16/int32/int64, numel n) -> bit stream of n*bits bits
// in whole words; only the low `bits` bits of each code are kept.  Chunk k
// of 32 codes fills words [k*bits, (k+1)*bits), code i of the chunk at bit
// i*bits (LSB first).
using PackBitsFn = void(const at::Tensor& codes, int bits, at::Tensor& packed);
inline Kernel<PackBitsFn> pack_bits{"pack_bits"};

// The inverse: fills codes (its numel and dtype say how many and of which
// type) from packed.
using UnpackBitsFn = void(const at::Tensor& packed, int bits, at::Tensor& codes);
inline Kernel<UnpackBitsFn> unpack_bits{"unpack_bits"};

}  // namespace aq::kernels
