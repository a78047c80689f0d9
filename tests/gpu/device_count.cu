// Built on the GPU machine by tests/gpu/run.sh (nvcc there) and run inside
// the container by tests/gpu.rs: prints how many CUDA devices the process
// sees and, when there is one, proves it by running a kernel on device 0.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void square(int *v) { v[threadIdx.x] *= v[threadIdx.x]; }

int main() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        printf("cuda devices: 0 (%s)\n", cudaGetErrorString(e));
        return 0;
    }
    printf("cuda devices: %d\n", n);
    int host[32], *dev = nullptr;
    for (int i = 0; i < 32; i++) host[i] = i;
    if (cudaMalloc(&dev, sizeof host) != cudaSuccess) return 2;
    cudaMemcpy(dev, host, sizeof host, cudaMemcpyHostToDevice);
    square<<<1, 32>>>(dev);
    cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
    cudaFree(dev);
    printf("kernel: 31*31 = %d\n", host[31]);
    return host[31] == 961 ? 0 : 3;
}
