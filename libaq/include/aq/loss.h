// The training loss for image and token models alike, and which
// architectures take tokens.
#pragma once

#include <torch/types.h>

#include <string>

namespace aq::train {

// Cross-entropy in fp32: of logits [N, C] against class labels [N], or per
// token, of logits [B, T, V] against next-token targets [B, T] (every token
// one term).  `sum`: the sum over samples or tokens, else the mean.
torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets, double label_smoothing = 0,
                            bool sum = false);

// The samples or tokens whose largest logit is the target: int64, 0-d.
torch::Tensor correct(const torch::Tensor& logits, const torch::Tensor& targets);

// Whether an architecture's forward takes int64 tokens [B, T] (and returns
// logits [B, T, V]) rather than images: the GPT-style decoders ("gpt_*").
bool takes_tokens(const std::string& arch);

}  // namespace aq::train
