"""Checked access to llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only what the stage engine needs: loading a model and a context, the evaluation callback that
captures a layer's output and stops the rest of the graph, and the build's identity. The ggml
functions the callback needs live in libggml-base, which llama-cpp-python ships but does not bind.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import llama_cpp
import numpy as np

import consortium.native


class LlamaError(RuntimeError):
    """llama.cpp refused or failed an operation."""


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:  # a build that links ggml statically into libllama
        lib = ctypes.CDLL(str(next(lib_dir.glob("libllama.*"))))
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nrows.argtypes = [ctypes.c_void_p]
    lib.ggml_nrows.restype = ctypes.c_int64
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_version.restype = ctypes.c_char_p
    lib.ggml_commit.restype = ctypes.c_char_p
    return lib


_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            if not os.environ.get("CONSORTIUM_LLAMA_VERBOSE"):
                llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@llama_cpp.llama_log_callback
def _silent_log(level, text, user_data):  # noqa: ARG001 - llama.cpp logs every tensor at load time
    return None


def build_info() -> dict:
    """The llama.cpp build this process runs: what a stage output is bit-exact against."""
    lib = _ggml_base()
    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "ggml_version": lib.ggml_version().decode(),
        "commit": lib.ggml_commit().decode(),
        "system_info": system,
    }


def detect_backend() -> str:
    """What llama.cpp actually offloads to on this machine: cuda, metal or cpu (never a claim)."""
    init_backend()
    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.lower()
    return "gpu"


class LayerOutputCapture:
    """An eval callback that copies `l_out-<layer>` out of the graph and stops the rest of it.

    Returning false after the copy makes ggml's scheduler skip the remaining nodes of that graph
    split, so a non-final stage never computes the final norm and LM head (on CPU: one split).
    ggml asks the callback about every node of the graph, so the callback is the C function in
    capture.c, compiled once with the system's C compiler and cached; where no compiler is found
    the same logic runs in Python, correct but slower (a few microseconds per node).
    """

    def __init__(self, layer: int, max_rows: int, width: int):
        self.name = f"l_out-{layer}".encode()
        self.width = width
        self.buffer = np.empty((max_rows, width), dtype=np.float32)
        self.rows = 0
        self.error: str | None = None
        self._lib = _ggml_base()
        native = _native_capture()
        if native is not None:
            lib = self._lib
            addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
            self._state = _CaptureState(
                addr(lib.ggml_get_name), addr(lib.ggml_nbytes), addr(lib.ggml_nrows), addr(lib.ggml_is_contiguous),
                addr(lib.ggml_backend_tensor_get), self.name, self.buffer.ctypes.data, self.buffer.nbytes)
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(ctypes.cast(native, ctypes.c_void_p).value)
            self.user_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
            self.native = True
        else:
            self._state = None
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
            self.user_data = None
            self.native = False

    def reset(self) -> None:
        self.rows, self.error = 0, None
        if self._state is not None:
            self._state.status, self._state.got_rows, self._state.got_bytes = 0, 0, 0

    def result(self, n_rows: int) -> np.ndarray:
        """The captured rows as a new array, or LlamaError if the capture did not happen as expected."""
        if self._state is not None:
            st = self._state
            if st.status == 2:
                raise LlamaError(f"layer output of {st.got_bytes} bytes exceeds the capture buffer")
            if st.status == 3:
                raise LlamaError("layer output tensor is not contiguous")
            self.rows = st.got_rows if st.status == 1 else 0
            got = st.got_bytes if st.status == 1 else 0
        else:
            if self.error:
                raise LlamaError(self.error)
            got = self.rows * self.width * 4
        if self.rows != n_rows or got != n_rows * self.width * 4:
            raise LlamaError(f"captured {self.rows} rows ({got} bytes) of layer output, expected {n_rows}x{self.width}")
        return self.buffer[:n_rows].copy()

    def _on_tensor(self, tensor, ask, user_data):  # noqa: ARG002
        lib = self._lib
        if lib.ggml_get_name(tensor) != self.name:
            return False if ask else True
        if ask:
            return True
        nbytes = lib.ggml_nbytes(tensor)
        n = lib.ggml_nelements(tensor)
        if not lib.ggml_is_contiguous(tensor) or nbytes != 4 * n or nbytes > self.buffer.nbytes:
            self.error = f"layer output is not contiguous float32 that fits ({nbytes} bytes for {n} elements)"
            return False
        lib.ggml_backend_tensor_get(tensor, self.buffer.ctypes.data, 0, nbytes)
        self.rows = lib.ggml_nrows(tensor)
        return False  # stop: nothing after this layer is needed


class _CaptureState(ctypes.Structure):
    # Mirrors struct capture in capture.c.
    _fields_ = [("get_name", ctypes.c_void_p), ("nbytes", ctypes.c_void_p), ("nrows", ctypes.c_void_p),
                ("is_contiguous", ctypes.c_void_p), ("tensor_get", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("dst", ctypes.c_void_p), ("capacity", ctypes.c_size_t), ("got_bytes", ctypes.c_size_t),
                ("got_rows", ctypes.c_int64), ("status", ctypes.c_int32)]


def _native_capture():
    """The C callback's address (capture.c, built once and cached); None if it cannot be built."""
    if os.environ.get("CONSORTIUM_PYTHON_CAPTURE"):
        return None
    lib = consortium.native.helper("capture")
    return None if lib is None else lib.consortium_capture_cb
