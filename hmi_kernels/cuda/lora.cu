// Segmented multi-adapter LoRA over a packed, mixed-tenant batch (Punica's SGMV/BGMV idea).
// Every token names the pool slot of its tenant's adapter (-1: no adapter); a slot's A is
// [max_rank, in] and its B [out, max_rank] (already scaled by alpha / rank), padded with zeros
// beyond the adapter's rank, which `slot_rank` lets the kernels skip.

// tmp[t, r] = sum_i x[t, i] * A[slot(t), r, i]        one warp per (token, r)
extern "C" __global__ void lora_shrink(const float* __restrict__ x, const float* __restrict__ lora_a,
                                       const int* __restrict__ token_slot, const int* __restrict__ slot_rank,
                                       float* __restrict__ tmp, int tokens, int in_dim, int max_rank) {
  const int token = blockIdx.x;
  const int r = blockIdx.y * blockDim.y + threadIdx.y;
  const int lane = threadIdx.x;
  if (token >= tokens || r >= max_rank) return;
  const int slot = token_slot[token];
  float sum = 0.0f;
  if (slot >= 0 && r < slot_rank[slot]) {
    const float* row = x + (long long)token * in_dim;
    const float* a = lora_a + ((long long)slot * max_rank + r) * in_dim;
    for (int i = lane; i < in_dim; i += 32) sum += row[i] * a[i];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) tmp[(long long)token * max_rank + r] = sum;
}

// out[t, o] += sum_r tmp[t, r] * B[slot(t), o, r]      one thread per (token, o)
extern "C" __global__ void lora_expand(const float* __restrict__ tmp, const float* __restrict__ lora_b,
                                       const int* __restrict__ token_slot, const int* __restrict__ slot_rank,
                                       float* __restrict__ out, int tokens, int out_dim, int max_rank) {
  const int token = blockIdx.y;
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= tokens || o >= out_dim) return;
  const int slot = token_slot[token];
  if (slot < 0) return;
  const int rank = slot_rank[slot];
  const float* t = tmp + (long long)token * max_rank;
  const float* b = lora_b + ((long long)slot * out_dim + o) * max_rank;
  float sum = 0.0f;
  for (int r = 0; r < rank; ++r) sum += t[r] * b[r];
  out[(long long)token * out_dim + o] += sum;
}
