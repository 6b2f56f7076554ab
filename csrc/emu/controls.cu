// controls.cu — the negative controls of the emulated run, appended by build.py to the translation
// unit of cuda_conv.cu (so that they reach its internal kernels) and rewritten like it.
//   emu_force_v3_vec     conv v3 with its float4 path forced on, whatever the alignment: on a
//                        misaligned x, UBSan must report the float4 load (the launcher would pick
//                        the scalar path there).
//   emu_interblock_race  blocks 0 and 2 of three add 1 to the same float without an atomic: a race
//                        between blocks that ThreadSanitizer must report.
// The third control, a barrier removed, needs no code: DLCONV_EMU_DROP_SYNC (cuda_emu.h).
namespace dlconv {
namespace cuda {

namespace {
// Blocks 0 and 2 add to out[0]; block 1, between them, writes out[1] only: the race needs no help
// from the block that ran in between (no happens-before accumulates across blocks either).
__global__ void emu_control_interblock(float* out) {
    if (threadIdx.x != 0) return;
    if (blockIdx.x == 1) out[1] = 1.f;
    else out[0] += 1.f;
}
}  // namespace

void emu_force_v3_vec(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y) {
    const int64_t M = g.batch * g.out_h * g.out_w, F = g.filters;
    dim3 grid(unsigned((M + V3_BM - 1) / V3_BM), unsigned((F + V3_BN - 1) / V3_BN));
    conv_fwd_v3_igemm<<<grid, V3_THREADS>>>(g, x, w, b, act, y, 1);
    check_launch("emu_force_v3_vec");
}

void emu_interblock_race(float* out) {
    emu_control_interblock<<<3, 32>>>(out);
    check_launch("emu_interblock_race");
}

}  // namespace cuda
}  // namespace dlconv
