// Selected denoising steps to training rows (CUDA path): one block per row, two passes.
//   1. count the row's targets (block reduction);
//   2. after an exclusive prefix sum over rows, fill input_ids and target_mask, and write the row's
//      targets in position order at its offset (warp ballots give each target its rank).

#include "step_rows.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace atpo_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void count_targets_kernel(const int64_t* __restrict__ steps, const int64_t* __restrict__ seq,
                                     const int64_t* __restrict__ start, const int64_t* __restrict__ end,
                                     int64_t length, int64_t* __restrict__ counts) {
  const int64_t r = blockIdx.x;
  const int64_t* sm = steps + seq[r] * length;
  const int64_t s = start[r], e = end[r];
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < length; i += kThreads) c += (sm[i] >= s) & (sm[i] < e);
  for (int delta = 16; delta > 0; delta /= 2) c += __shfl_down_sync(0xffffffffu, c, delta);
  __shared__ int64_t warp_sums[kWarps];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    counts[r] = total;
  }
}

__global__ void fill_rows_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ steps,
                                 const int64_t* __restrict__ seq, const int64_t* __restrict__ start,
                                 const int64_t* __restrict__ end, const int64_t* __restrict__ offsets,
                                 int64_t length, int64_t mask_id, int64_t* __restrict__ input_ids,
                                 bool* __restrict__ target_mask, int64_t* __restrict__ target_row,
                                 int64_t* __restrict__ target_pos, int64_t* __restrict__ target_token) {
  const int64_t r = blockIdx.x;
  const int64_t* sm = steps + seq[r] * length;
  const int64_t* tk = tokens + seq[r] * length;
  const int64_t s = start[r], e = end[r];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ int warp_counts[kWarps];
  __shared__ int warp_offsets[kWarps];
  int64_t base = offsets[r];
  for (int64_t tile = 0; tile < length; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const bool in_row = i < length;
    const int64_t step = in_row ? sm[i] : -1;
    const bool masked = step >= s;
    const bool target = masked && step < e;
    if (in_row) {
      input_ids[r * length + i] = masked ? mask_id : tk[i];
      target_mask[r * length + i] = target;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, target);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
      int running = 0;
      for (int w = 0; w < kWarps; ++w) {
        warp_offsets[w] = running;
        running += warp_counts[w];
      }
      warp_counts[0] = running;  // the tile's total, read below
    }
    __syncthreads();
    if (target) {
      const int64_t o = base + warp_offsets[warp] + __popc(ballot & ((1u << lane) - 1u));
      target_row[o] = r;
      target_pos[o] = i;
      target_token[o] = tk[i];
    }
    base += warp_counts[0];
    __syncthreads();  // warp_counts / warp_offsets are rewritten by the next tile
  }
}

}  // namespace

std::vector<torch::Tensor> build_step_rows_cuda(const torch::Tensor& tokens, const torch::Tensor& step_map,
                                                const RowList& rows, int64_t mask_id) {
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t n_rows = rows.seq.size(0), length = tokens.size(1);
  auto long_opts = tokens.options();
  auto counts = torch::empty({n_rows}, long_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n_rows > 0 && length > 0) {
    count_targets_kernel<<<n_rows, kThreads, 0, stream>>>(step_map.data_ptr<int64_t>(), rows.seq.data_ptr<int64_t>(),
                                                          rows.start.data_ptr<int64_t>(), rows.end.data_ptr<int64_t>(),
                                                          length, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    counts.zero_();
  }
  auto ends_incl = counts.cumsum(0);
  const int64_t n_targets = n_rows > 0 ? ends_incl[-1].item<int64_t>() : 0;
  auto offsets = ends_incl - counts;

  auto input_ids = torch::empty({n_rows, length}, long_opts);
  auto target_mask = torch::empty({n_rows, length}, long_opts.dtype(torch::kBool));
  auto target_row = torch::empty({n_targets}, long_opts);
  auto target_pos = torch::empty({n_targets}, long_opts);
  auto target_token = torch::empty({n_targets}, long_opts);
  if (n_rows > 0 && length > 0) {
    fill_rows_kernel<<<n_rows, kThreads, 0, stream>>>(
        tokens.data_ptr<int64_t>(), step_map.data_ptr<int64_t>(), rows.seq.data_ptr<int64_t>(),
        rows.start.data_ptr<int64_t>(), rows.end.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), length, mask_id,
        input_ids.data_ptr<int64_t>(), target_mask.data_ptr<bool>(), target_row.data_ptr<int64_t>(),
        target_pos.data_ptr<int64_t>(), target_token.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {input_ids, target_mask, rows.seq, rows.start, target_row, target_pos, target_token};
}

}  // namespace atpo_fast
