"""The stage engine: run a contiguous range of a GGUF model's layers on llama.cpp.

slicing    cuts a GGUF into a stage file for layers a..b (raw quantized tensors, renumbered from 0)
llama      thin, checked access to llama.cpp's C API through llama-cpp-python
stage      a loaded stage: token ids or hidden states in, hidden states or logits out, per sequence
reference  an independent numpy implementation of a layer range, to prove the slicing right
"""
