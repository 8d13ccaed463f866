// PLOT rows (fp16, as the store streams them) into the packed fp32 hidden-state buffer:
// hidden[dest[i], :] = float(rows[i, :]). No cuda_fp16.h: the conversion is one PTX instruction,
// so the source compiles with NVRTC alone.

__device__ __forceinline__ float half_bits_to_float(unsigned short bits) {
  float value;
  asm("{ cvt.f32.f16 %0, %1; }" : "=f"(value) : "h"(bits));
  return value;
}

extern "C" __global__ void plot_gather(const unsigned short* __restrict__ rows, const long long* __restrict__ dest,
                                       float* __restrict__ hidden, int n_rows, int hidden_dim) {
  const int row = blockIdx.y;
  const int column = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n_rows || column >= hidden_dim) return;
  hidden[dest[row] * hidden_dim + column] = half_bits_to_float(rows[(long long)row * hidden_dim + column]);
}
