// Selected denoising steps to training rows (CPU path, input checks and the Python binding).
//
// Row r comes from sequence b with interval [s, e): input_ids[r] = tokens[b] with every position whose
// step_map >= s set to mask_id (the state before step s); the targets are positions with
// s <= step_map < e. Two passes: ids, mask and target counts per row; prefix sum; target lists.

#include "step_rows.h"

#include <ATen/Parallel.h>

namespace atpo_fast {
namespace {

void check_inputs(const torch::Tensor& tokens, const torch::Tensor& step_map, const torch::Tensor& starts,
                  const torch::Tensor& ends, int64_t mask_id) {
  TORCH_CHECK_VALUE(tokens.dim() == 2, "tokens must have shape [B, L], got ", tokens.sizes());
  TORCH_CHECK_VALUE(tokens.scalar_type() == torch::kLong, "tokens must be int64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(step_map.sizes() == tokens.sizes(), "step_map must have tokens' shape ", tokens.sizes(),
                    ", got ", step_map.sizes());
  TORCH_CHECK_VALUE(step_map.scalar_type() == torch::kLong || step_map.scalar_type() == torch::kInt,
                    "step_map must be int32 or int64, got ", step_map.scalar_type());
  TORCH_CHECK_VALUE(starts.dim() == 2 && starts.size(0) == tokens.size(0),
                    "starts must have shape [B=", tokens.size(0), ", k], got ", starts.sizes());
  TORCH_CHECK_VALUE(ends.sizes() == starts.sizes(), "ends must have starts' shape ", starts.sizes(), ", got ",
                    ends.sizes());
  TORCH_CHECK_VALUE(starts.scalar_type() == torch::kLong, "starts must be int64, got ", starts.scalar_type());
  TORCH_CHECK_VALUE(ends.scalar_type() == torch::kLong, "ends must be int64, got ", ends.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"step_map", step_map},
                                {"starts", starts}, {"ends", ends}}) {
    TORCH_CHECK_VALUE(t.device() == tokens.device(), name, " must be on tokens' device ", tokens.device(),
                      ", got ", t.device());
  }
  TORCH_CHECK_VALUE(mask_id >= 0, "mask_id must be >= 0, got ", mask_id);
  if (step_map.numel() > 0) {
    const int64_t smallest = step_map.min().item<int64_t>();
    TORCH_CHECK_VALUE(smallest >= -1, "step_map must hold steps >= 0 or -1 (prompt / never masked), found ",
                      smallest);
  }
}

// The used slots as (sequence, start, end), checked on the host (starts and ends are only [B, k]).
RowList collect_rows(const torch::Tensor& starts, const torch::Tensor& ends, const torch::Device& device) {
  const auto s = starts.to(torch::kCPU).contiguous();
  const auto e = ends.to(torch::kCPU).contiguous();
  const int64_t batch = s.size(0), slots = s.size(1);
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* ep = e.data_ptr<int64_t>();
  std::vector<int64_t> seq, start, end;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t a = sp[b * slots + j], z = ep[b * slots + j];
      if (a == -1 || z == -1) {
        TORCH_CHECK_VALUE(a == -1 && z == -1, "starts and ends must mark an unused slot with -1 together; slot [",
                          b, ", ", j, "] has start ", a, " and end ", z);
        continue;
      }
      TORCH_CHECK_VALUE(a >= 0, "starts must be >= 0 or -1, got ", a, " at [", b, ", ", j, "]");
      TORCH_CHECK_VALUE(a <= z, "starts must not exceed ends, got start ", a, " > end ", z, " at [", b, ", ", j,
                        "]");
      seq.push_back(b);
      start.push_back(a);
      end.push_back(z);
    }
  }
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::dtype(torch::kLong)).to(device);
  };
  return {as_tensor(seq), as_tensor(start), as_tensor(end)};
}

std::vector<torch::Tensor> build_step_rows_cpu(const torch::Tensor& tokens, const torch::Tensor& step_map,
                                               const RowList& rows, int64_t mask_id) {
  const int64_t n_rows = rows.seq.size(0), length = tokens.size(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* steps = step_map.data_ptr<int64_t>();
  const int64_t* seq = rows.seq.data_ptr<int64_t>();
  const int64_t* start = rows.start.data_ptr<int64_t>();
  const int64_t* end = rows.end.data_ptr<int64_t>();
  auto long_opts = torch::dtype(torch::kLong);
  auto input_ids = torch::empty({n_rows, length}, long_opts);
  auto target_mask = torch::empty({n_rows, length}, torch::dtype(torch::kBool));
  int64_t* ids = input_ids.data_ptr<int64_t>();
  bool* is_target = target_mask.data_ptr<bool>();

  // Pass 1: input ids and target mask (a branch-free loop the compiler vectorises), and target counts.
  std::vector<int64_t> count(n_rows);
  at::parallel_for(0, n_rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t* sm = steps + seq[r] * length;
      const int64_t* tk = tok + seq[r] * length;
      int64_t* out = ids + r * length;
      bool* mask = is_target + r * length;
      const int64_t s = start[r], e = end[r];
      int64_t c = 0;
      for (int64_t i = 0; i < length; ++i) {
        const bool masked = sm[i] >= s;
        const bool target = masked & (sm[i] < e);
        out[i] = masked ? mask_id : tk[i];
        mask[i] = target;
        c += target;
      }
      count[r] = c;
    }
  });
  std::vector<int64_t> offset(n_rows + 1, 0);
  for (int64_t r = 0; r < n_rows; ++r) offset[r + 1] = offset[r] + count[r];
  const int64_t n_targets = offset[n_rows];

  // Pass 2: each row's targets, in position order, from the 1-byte mask.
  auto target_row = torch::empty({n_targets}, long_opts);
  auto target_pos = torch::empty({n_targets}, long_opts);
  auto target_token = torch::empty({n_targets}, long_opts);
  int64_t* t_row = target_row.data_ptr<int64_t>();
  int64_t* t_pos = target_pos.data_ptr<int64_t>();
  int64_t* t_tok = target_token.data_ptr<int64_t>();
  at::parallel_for(0, n_rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const bool* mask = is_target + r * length;
      const int64_t* tk = tok + seq[r] * length;
      for (int64_t i = 0, o = offset[r]; i < length; ++i) {
        if (mask[i]) {
          t_row[o] = r;
          t_pos[o] = i;
          t_tok[o] = tk[i];
          ++o;
        }
      }
    }
  });
  return {input_ids, target_mask, rows.seq, rows.start, target_row, target_pos, target_token};
}

}  // namespace

std::vector<torch::Tensor> build_step_rows(const torch::Tensor& tokens, const torch::Tensor& step_map,
                                           const torch::Tensor& starts, const torch::Tensor& ends,
                                           int64_t mask_id) {
  check_inputs(tokens, step_map, starts, ends, mask_id);
  const RowList rows = collect_rows(starts, ends, tokens.device());
  const auto tok = tokens.contiguous();
  const auto steps = step_map.to(torch::kLong).contiguous();
  if (tokens.is_cuda()) {
#ifdef WITH_CUDA
    return build_step_rows_cuda(tok, steps, rows, mask_id);
#else
    TORCH_CHECK_VALUE(false, "tokens is a CUDA tensor but atpo_fast._C was built without CUDA; "
                      "use backend='torch' or rebuild with a CUDA toolkit and a CUDA build of torch");
#endif
  }
  TORCH_CHECK_VALUE(tokens.is_cpu(), "tokens must be a CPU or CUDA tensor, got ", tokens.device());
  return build_step_rows_cpu(tok, steps, rows, mask_id);
}

}  // namespace atpo_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "atpo_fast native ops";
  m.def("build_step_rows", &atpo_fast::build_step_rows,
        "Selected steps to training rows: (input_ids, target_mask, seq_index, step_start, target_row, "
        "target_pos, target_token)",
        pybind11::arg("tokens"), pybind11::arg("step_map"), pybind11::arg("starts"), pybind11::arg("ends"),
        pybind11::arg("mask_id"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
