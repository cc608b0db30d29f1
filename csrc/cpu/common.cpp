// Shared helpers of the CPU kernels (placeholder translation unit so the library is never empty).
namespace specrt::cpu {
int version() { return 1; }
}  // namespace specrt::cpu
