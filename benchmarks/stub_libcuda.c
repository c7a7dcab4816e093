// A libcuda.so.1 in which every call succeeds and nothing runs (an H100/H200-like device: 132
// multiprocessors, compute capability 9.0). benchmarks/triton_host_cost.py loads it on a machine without
// a GPU, so that Triton compiles for sm_90 with ptxas and its launcher runs to the driver call, and the host
// cost of a launch can be timed on a CPU. Only the symbols Triton's CUDA driver module uses are here.
#include <stddef.h>
#include <stdint.h>
#include <string.h>
typedef int CUresult;
static int dummy;  // the one context, module and function handle
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGet(int *d, int i) { *d = i; return 0; }
CUresult cuDeviceGetCount(int *c) { *c = 1; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) {
  switch (attr) {
    case 16: *v = 132; break;            // multiprocessors
    case 75: *v = 9; break;              // major
    case 76: *v = 0; break;              // minor
    case 97: *v = 232448; break;         // max shared per block optin
    default: *v = 1024; break;
  }
  return 0;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { *ctx = &dummy; return 0; }
CUresult cuDevicePrimaryCtxGetState(int dev, unsigned *flags, int *active) { *flags = 0; *active = 1; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = &dummy; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxGetLimit(size_t *v, int l) { *v = 1024; return 0; }
CUresult cuCtxSetLimit(int l, size_t v) { return 0; }
CUresult cuFuncGetAttribute(int *v, int attr, void *f) { *v = (attr == 0) ? 1024 : 0; return 0; }
CUresult cuFuncSetAttribute(void *f, int attr, int v) { return 0; }
CUresult cuFuncSetCacheConfig(void *f, int c) { return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub"; return 0; }
CUresult cuModuleLoadData(void **m, const void *image) { *m = &dummy; return 0; }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) { *f = &dummy; return 0; }
CUresult cuModuleUnload(void *m) { return 0; }
CUresult cuPointerGetAttribute(void *data, int attr, uint64_t ptr) { *(uint64_t *)data = ptr; return 0; }
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, uint64_t ptr) {
  for (unsigned i = 0; i < n; i++) *(uint64_t *)data[i] = ptr; return 0; }
CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *n, void *f, const void *config) { *n = 1; return 0; }
CUresult cuTensorMapEncodeTiled(void *m, ...) { return 0; }
CUresult cuTensorMapEncodeIm2col(void *m, ...) { return 0; }
