// Selected denoising steps to training rows: shared declarations of the CPU and CUDA paths.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace atpo_fast {

// Rows are the used (start, end) slots, ordered by sequence then slot. Each is held as
// (sequence, start, end) in three int64 tensors of length R on the tokens' device.
struct RowList {
  torch::Tensor seq, start, end;
};

// Outputs: input_ids [R, L] int64, target_mask [R, L] bool, seq_index [R], step_start [R],
// target_row [P], target_pos [P], target_token [P] (all int64 but the mask).
std::vector<torch::Tensor> build_step_rows(const torch::Tensor& tokens, const torch::Tensor& step_map,
                                           const torch::Tensor& starts, const torch::Tensor& ends,
                                           int64_t mask_id);

#ifdef WITH_CUDA
// CUDA fill: step_map is int64 and contiguous, like tokens.
std::vector<torch::Tensor> build_step_rows_cuda(const torch::Tensor& tokens, const torch::Tensor& step_map,
                                                const RowList& rows, int64_t mask_id);
#endif

}  // namespace atpo_fast
