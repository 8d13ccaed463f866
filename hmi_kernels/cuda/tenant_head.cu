// Per-tenant classification heads over pooled sequence vectors, heads addressed by pool slot:
// logits[s, j] = pooled[s, :] . W[slot(s), j, :] + b[slot(s), j] for j < labels(s), else 0.
// One warp per (sequence, label).

extern "C" __global__ void tenant_head(const float* __restrict__ pooled, const float* __restrict__ weight,
                                       const float* __restrict__ bias, const int* __restrict__ seq_slot,
                                       const int* __restrict__ seq_labels, float* __restrict__ logits,
                                       int sequences, int hidden_dim, int max_labels) {
  const int seq = blockIdx.x;
  const int label = blockIdx.y * blockDim.y + threadIdx.y;
  const int lane = threadIdx.x;
  if (seq >= sequences || label >= max_labels) return;
  const int slot = seq_slot[seq];
  float sum = 0.0f;
  const bool used = slot >= 0 && label < seq_labels[seq];
  if (used) {
    const float* p = pooled + (long long)seq * hidden_dim;
    const float* w = weight + ((long long)slot * max_labels + label) * hidden_dim;
    for (int i = lane; i < hidden_dim; i += 32) sum += p[i] * w[i];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) logits[(long long)seq * max_labels + label] = used ? sum + bias[slot * max_labels + label] : 0.0f;
}
