// TS_HD marks small inline functions that both the host code and CUDA kernels call, so the two sides
// compute the very same expression (hashes, NF4 decoding). Empty for plain C++ compilers, including
// the CUDA emulator build, where kernels are ordinary C++.
#pragma once

#if defined(__CUDACC__)
#define TS_HD __host__ __device__
#else
#define TS_HD
#endif
