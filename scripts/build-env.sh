# Sourced by setup.sh and llama-rpc.sh: the cache root, the Python, the llama-cpp-python version the
# project pins (pyproject.toml), and the key of this CPU's vector features. Both build llama.cpp with
# GGML_NATIVE, so what they cache is keyed by the CPU too: a cache carried to a different CPU is
# rebuilt instead of crashing with SIGILL.
CACHE="${CONSORTIUM_CACHE:-$HOME/.cache/consortium}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION=0.3.36
cpu_key=$(grep -m1 -oE '\b(avx512[a-z_0-9]*|avx2|avx|fma|f16c|neon|asimd[a-z]*)\b' /proc/cpuinfo 2>/dev/null \
          | sort -u | tr -d '\n' | sha256sum | cut -c1-12 || echo unknown)
