"""The op microbenchmarks behind ``flexkd bench``: ``ops_cpu`` (flexkd's C++ kernels against the
user's formula, eager and ``torch.compile``), ``ops_gpu`` (the CUDA and Triton kernels against the
same), ``user_formulas`` (those baselines) and ``common`` (timing and memory helpers, the options
both share). ``benchmarks/bench_ops.py`` and
``benchmarks/bench_gpu.py`` are thin wrappers over them."""
