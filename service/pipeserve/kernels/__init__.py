"""Kernels: pipeserve's own native operators, C++ compiled on the machine that runs them.

grid_linear.cpp registers torch operators (TORCH_LIBRARY namespace `pipeserve`) that multiply
float32 activations by weights held on per-group grids (the "grouped" form's linears, used by
layers/grid_int4.py); rms_norm.cpp registers RMSNorm and the residual add with its norm in one
call each (layers/norms.py), decode_attention.cpp a decoding step's attention block after the
q/k/v projection (layers/kv_cache.py attend_step_native); quantized Gemma takes both. They split their work over the calling thread's OpenMP team (torch's
libgomp), so they follow the thread count torch or the compute lane gave that thread and the
callers' serial sections, and bring no OpenMP runtime of their own (parallel.h). `build` compiles
the sources with g++ and torch's headers into a cache keyed by source, torch and CPU (run by
scripts/setup, never at request time); `library` loads the built library once and says why
not where it cannot, so callers keep their torch path. The build's cache is the process's cache
directory (checkpoints.gguf_cache.cache_dir).

May import: core, checkpoints.
"""
