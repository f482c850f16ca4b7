"""Cut a GGUF model into stage files, each holding a contiguous range of its transformer blocks.

llama.cpp has no "run layers a..b" call, but a GGUF whose blocks a..b are renumbered from 0 and whose
block_count is b-a+1 is a model llama.cpp runs as it is. Tensors are copied raw (still quantized), so
a stage computes exactly what the same layers compute inside the whole model, provided every
per-layer attribute survives the renumbering: arrays indexed by layer are sliced, and attributes that
llama.cpp derives from a layer's index (Gemma 3's sliding-window pattern) are written out explicitly.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np

import consortium.cache
from consortium.layers import LayerRange

# Each checked against llama.cpp's loader and graph for the architecture (llama-cpp-python 0.3.36's
# sources): the layer output is named l_out-<i>, hidden states fed through embd are used unscaled (or,
# for gemma3, only token input is scaled), and what depends on a layer's index or on the layer count
# is written out or refused below. qwen2 and qwen3 derive nothing from either (the layer count only
# names the model's size in its log); tested like llama on synthetic models of their shapes.
SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3")
STAGE_FORMAT = 2  # bump when stage files are written differently: cached files of older formats are not reused
MODEL_INFO_FORMAT = 2  # bump when ModelInfo's fields change meaning: remembered infos of older formats are not read

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class UnsupportedModelError(ValueError):
    """The model's architecture (or a variant of it) cannot be split correctly by this engine."""


class ModelChecksumError(ValueError):
    """The model file's sha256 differs from the one the session names."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    n_layers: int
    n_embd: int
    n_vocab: int
    tied_output: bool  # no output.weight: the LM head reuses token_embd
    file_type: str     # quantization of the bulk of the weights, e.g. Q4_1, Q4_K_M
    # Bytes of the weights by where they go (from the tensor index): each block's, token_embd,
    # output.weight (0 when tied), and the rest (output_norm, rope_freqs, ...), which every stage keeps.
    block_bytes: tuple[int, ...] = ()
    embd_bytes: int = 0
    output_bytes: int = 0
    other_bytes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _replace_path(self, path: str) -> "ModelInfo":
        return dataclasses.replace(self, path=path)


def _reader(path: str | os.PathLike):
    import gguf  # heavy import kept local: the CLI imports this module for --help

    return gguf.GGUFReader(str(path), "r")


def _field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    st = os.stat(path)
    return _read_model_info(os.path.realpath(path), st.st_size, st.st_mtime_ns)._replace_path(path)


@functools.lru_cache(maxsize=64)
def _read_model_info(path: str, size: int, mtime_ns: int) -> ModelInfo:
    # gguf-py takes seconds to parse a vocabulary of 50k-250k strings (4 s for the default model, 12 s
    # for Gemma 3 here), and every agent, driver and test process would pay it: a file is parsed once
    # per (path, size, mtime) on this machine, and once per process after that.
    memo = consortium.cache.cache_dir() / "model-info" / f"v{MODEL_INFO_FORMAT}-{_file_key(path, size, mtime_ns)}.json"
    if memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            return ModelInfo(**{**saved, "block_bytes": tuple(saved.get("block_bytes", ()))})
        except (ValueError, TypeError):
            pass   # unreadable or from another version of ModelInfo: parse again and rewrite it
    info = _parse_model_info(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info.to_dict()))
    os.replace(tmp, memo)
    return info


def _parse_model_info(path: str) -> ModelInfo:
    import gguf

    reader = _reader(path)
    arch = _field_value(reader, "general.architecture")
    if arch is None:
        raise UnsupportedModelError(f"{path} has no general.architecture: not a GGUF model file")
    n_layers = _field_value(reader, f"{arch}.block_count")
    n_embd = _field_value(reader, f"{arch}.embedding_length")
    names = {t.name: t for t in reader.tensors}
    embd = names.get("token_embd.weight")
    n_vocab = int(embd.shape[1]) if embd is not None else int(_field_value(reader, f"{arch}.vocab_size", 0))
    ftype = _field_value(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        file_type = f"type{ftype}"
    blocks, other = [0] * int(n_layers or 0), 0
    for t in reader.tensors:
        m = _BLOCK_RE.match(t.name)
        if m and int(m.group(1)) < len(blocks):
            blocks[int(m.group(1))] += int(t.n_bytes)
        elif t.name not in ("token_embd.weight", "output.weight"):
            other += int(t.n_bytes)
    return ModelInfo(path=path, architecture=arch, n_layers=int(n_layers or 0), n_embd=int(n_embd or 0),
                     n_vocab=n_vocab, tied_output="output.weight" not in names, file_type=file_type,
                     block_bytes=tuple(blocks), embd_bytes=int(embd.n_bytes) if embd is not None else 0,
                     output_bytes=int(names["output.weight"].n_bytes) if "output.weight" in names else 0,
                     other_bytes=other)


def stage_weight_bytes(info: ModelInfo, layers: LayerRange) -> int:
    """Bytes of the weights a stage of `layers` loads, as slice_model writes its file: its blocks and
    the small shared tensors; token_embd on the first and the final stage (the final one's LM head
    when tied, and the loader wants it), output.weight on the final stage; a middle stage's stand-in
    embedding is one row."""
    first, last = layers.first == 0, layers.last == info.n_layers - 1
    return (sum(info.block_bytes[layers.first:layers.last + 1]) + info.other_bytes
            + (info.embd_bytes if first or last else 4 * info.n_embd) + (info.output_bytes if last else 0))


# Architectures checked and found unsplittable on this llama.cpp, with the reason.
_UNSPLITTABLE = {
    arch: ("llama.cpp scales a layer-0 input fed through embd by sqrt(n_embd) as it scales token "
           "embeddings (gemma3 scales token input only), so every stage after the first would compute on "
           "inputs scaled twice")
    for arch in ("gemma", "gemma2")
}


def check_supported(info: ModelInfo) -> None:
    if info.architecture in _UNSPLITTABLE:
        raise UnsupportedModelError(f"architecture {info.architecture!r} cannot be split: "
                                    f"{_UNSPLITTABLE[info.architecture]}")
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {info.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            f"its per-layer attributes have not been checked, so a split of it could silently compute the wrong thing")
    if info.architecture == "gemma3" and info.n_layers == 62:
        # llama.cpp picks Gemma 3 27B's attention scale from its layer count (62); a stage has fewer
        # layers and would silently get the scale of the smaller models.
        raise UnsupportedModelError("gemma3 with 62 layers (27B) cannot be split: llama.cpp derives its "
                                    "attention scale from the layer count, which a stage changes")


def _file_key(realpath: str, size: int, mtime_ns: int) -> str:
    """What a memo of a file's content is filed under: its path, size and modification time."""
    return hashlib.sha256(f"{realpath}\0{size}\0{mtime_ns}".encode()).hexdigest()[:32]


# Digests this process computed, by the file's identity: an agent checks the model named by every
# LoadStage, Prepare and Audit, and hashing a 1 GB model each time took 0.64 s.
_hashed: dict[tuple, str] = {}
_hashed_lock = threading.Lock()


def sha256_file(path: str | os.PathLike, cache_dir: Path | None = None) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so an 8B model is hashed once, not per run:
    in this process (with the file's device and inode too) and, with cache_dir, across runs."""
    path = os.path.realpath(path)
    st = os.stat(path)
    identity = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _hashed_lock:
        known = _hashed.get(identity)
    if known is not None:
        return known
    memo = (cache_dir / "sha256" / _file_key(path, st.st_size, st.st_mtime_ns)) if cache_dir else None
    if memo and memo.is_file():
        digest = memo.read_text().strip()
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if memo:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(digest)
    with _hashed_lock:
        _hashed[identity] = digest
    return digest


def verify_sha256(path: str | os.PathLike, expected: str, cache_dir: Path | None = None) -> str:
    actual = sha256_file(path, cache_dir)
    if actual.lower() != expected.strip().lower():
        raise ModelChecksumError(f"model file {path} has sha256 {actual}, but the session expects {expected.strip()}")
    return actual


def _per_layer_overrides(reader, arch: str, n_layers: int) -> dict[str, list]:
    """Per-layer attributes llama.cpp derives from a layer's index, written out as explicit arrays."""
    out: dict[str, list] = {}
    if arch == "gemma3":
        key = f"{arch}.attention.sliding_window_pattern"
        window = _field_value(reader, f"{arch}.attention.sliding_window", 0) or 0
        value = _field_value(reader, key)
        if window > 0 and not isinstance(value, list):
            # Same rule as llama.cpp's set_swa_pattern(n, dense_first=false): within each period of n
            # layers the last one is global (full attention), the others use the sliding window.
            n = 6 if value is None else int(value)
            out[key] = [bool(n == 0 or (il % n) < (n - 1)) for il in range(n_layers)]
    return out


def slice_model(src: str | os.PathLike, layers: LayerRange, dst: str | os.PathLike,
                *, source_sha256: str = "") -> Path:
    """Write a stage file for `layers` of `src` to `dst` and return its path."""
    import gguf

    info = read_model_info(src)
    check_supported(info)
    if layers.last >= info.n_layers:
        raise ValueError(f"layers {layers} run past the model: it has {info.n_layers} layers (0-{info.n_layers - 1})")
    is_last = layers.last == info.n_layers - 1
    # A middle stage never sees a token id nor computes logits, but llama.cpp's loader wants a
    # token_embd of [n_embd, n_vocab] and reserves n_vocab logits per output row. Giving it a
    # vocabulary of one dummy token saves the embedding (for Llama 3, ~280 MB in Q4_K) and the
    # logits buffers; the blocks, which are all the stage computes, are untouched.
    vocabless = layers.first != 0 and not is_last
    reader = _reader(src)
    arch = info.architecture
    n_all = info.n_layers

    writer = gguf.GGUFWriter(str(dst), arch)
    alignment = _field_value(reader, "general.alignment")
    if alignment:
        writer.data_alignment = int(alignment)

    overrides = _per_layer_overrides(reader, arch, n_all)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if vocabless and (key.startswith("tokenizer.") or key == f"{arch}.vocab_size"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key == f"{arch}.block_count":
            value = layers.count
        elif key in overrides:
            continue
        elif (vtype == gguf.GGUFValueType.ARRAY and key.startswith(arch + ".")
              and isinstance(value, list) and len(value) == n_all):
            value = value[layers.first:layers.last + 1]  # an attribute indexed by layer
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if vocabless:
        writer.add_string("tokenizer.ggml.model", "none")
        writer.add_uint32(f"{arch}.vocab_size", 1)
    for key, per_layer in overrides.items():
        writer.add_array(key, per_layer[layers.first:layers.last + 1])
    writer.add_uint32("consortium.stage.first_layer", layers.first)
    writer.add_uint32("consortium.stage.last_layer", layers.last)
    writer.add_uint32("consortium.stage.source_block_count", n_all)
    if source_sha256:
        writer.add_string("consortium.stage.source_sha256", source_sha256)

    for t in reader.tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            il = int(m.group(1))
            if not layers.first <= il <= layers.last:
                continue
            name = f"blk.{il - layers.first}.{m.group(2)}"
        elif t.name == "output.weight" and not is_last:
            continue  # the LM head only runs on the final stage; llama.cpp then reuses token_embd
        elif t.name == "token_embd.weight" and vocabless:
            writer.add_tensor(t.name, np.zeros((1, info.n_embd), dtype=np.float32))
            continue
        else:
            name = t.name  # token_embd (required by the loader), output_norm, rope_freqs, ...
        writer.add_tensor(name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def stage_file(model_path: str | os.PathLike, layers: LayerRange, *, cache_dir: Path | None = None,
               model_sha256: str | None = None) -> Path:
    """The stage file for `layers` of a model, sliced once and cached by (model sha256, range)."""
    cache_dir = cache_dir or consortium.cache.cache_dir()
    info = read_model_info(model_path)
    check_supported(info)
    validate_range(layers, info)
    digest = model_sha256 or sha256_file(model_path, cache_dir)
    if info.n_layers == layers.count:
        return Path(model_path)  # the whole model: nothing to slice
    out = cache_dir / "stages" / digest[:32] / f"v{STAGE_FORMAT}-layers-{layers.first}-{layers.last}.gguf"
    return consortium.cache.made_once(out, lambda tmp: slice_model(model_path, layers, tmp, source_sha256=digest))


def validate_range(layers: LayerRange, info: ModelInfo) -> None:
    if layers.last >= info.n_layers:
        raise ValueError(f"layers {layers} run past the model: {os.path.basename(info.path)} has "
                         f"{info.n_layers} layers (0-{info.n_layers - 1})")


def describe_stage_file(path: str | os.PathLike) -> dict:
    reader = _reader(path)
    return {k: _field_value(reader, k) for k in ("consortium.stage.first_layer", "consortium.stage.last_layer",
                                                "consortium.stage.source_block_count",
                                                "consortium.stage.source_sha256")}


__all__ = ["ModelInfo", "UnsupportedModelError", "ModelChecksumError", "read_model_info", "check_supported",
           "slice_model", "stage_file", "sha256_file", "verify_sha256"]
