"""Tokenizer and chat template of a GGUF model, read with llama.cpp from the model file itself.

Only the vocabulary is loaded (no weights), so the session driver can tokenize and detokenize on a
machine that runs no stage. The prompt is rendered with the model's own chat template; a BOS token
is added only when the vocabulary asks for one and the template did not already write it.
"""
from __future__ import annotations

import os

import llama_cpp
from llama_cpp import _internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        from node_agent.engine.llama import init_backend  # silences llama.cpp's load log

        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = _internals.LlamaModel(path_model=str(model_path), params=params, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self.n_vocab = self._model.n_vocab()
        # A model without a tokenizer (the synthetic ones) has only ids: llama.cpp aborts the whole
        # process when asked to tokenize with it, so encode() refuses first.
        self.has_vocab = llama_cpp.llama_vocab_type(self._vocab) != llama_cpp.LLAMA_VOCAB_TYPE_NONE
        self._path = str(model_path)
        self.bos_id = self._model.token_bos()
        self.eos_id = self._model.token_eos()
        template = llama_cpp.llama_model_chat_template(self._model.model, None)
        self.chat_template = template.decode("utf-8") if template else None

    def token_text(self, token: int) -> str:
        return self._model.token_get_text(token) if 0 <= token < self.n_vocab else ""

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        if not self.has_vocab:
            raise ValueError(f"{self._path} has no tokenizer: it takes token ids, not text")
        add_bos = self._model.add_bos_token() and not (
            self.bos_id >= 0 and text.startswith(self.token_text(self.bos_id)))
        return list(self._model.tokenize(text.encode("utf-8"), add_bos, special))

    def decode(self, tokens: list[int]) -> str:
        if not self.has_vocab:
            return " ".join(map(str, tokens))
        return self._model.detokenize(list(tokens), special=False).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for chat `messages`, through the model's own template."""
        if not self.chat_template:
            if len(messages) == 1 and messages[0].get("role") == "user":
                return messages[0]["content"]  # a base model: the prompt as it is
            raise ValueError("this model has no chat template; give a plain prompt instead of messages")
        formatter = Jinja2ChatFormatter(
            template=self.chat_template,
            eos_token=self.token_text(self.eos_id) if self.eos_id >= 0 else "",
            bos_token=self.token_text(self.bos_id) if self.bos_id >= 0 else "",
            add_generation_prompt=True)
        return formatter(messages=messages).prompt

    def prompt_tokens(self, prompt: str | None = None, messages: list[dict] | None = None,
                      *, raw: bool = False) -> list[int]:
        """Token ids for a user prompt (wrapped in the chat template unless raw) or chat messages."""
        if messages is None:
            if prompt is None:
                raise ValueError("give a prompt or chat messages")
            if raw:
                return self.encode(prompt, special=False)
            messages = [{"role": "user", "content": prompt}]
        return self.encode(self.render_chat(messages))

    def close(self) -> None:
        self._model.close()


__all__ = ["Tokenizer"]


def benchmark_prompt(model_path: str | os.PathLike, prompt: str) -> list[int]:
    """`prompt` as token ids for a benchmark. A model without a tokenizer (a synthetic model, to
    measure how costs scale with size) gets the prompt's UTF-8 bytes as ids: its timing depends on
    the number of rows, not on which ids they are."""
    tok = Tokenizer(model_path)
    try:
        if tok.has_vocab:
            return tok.prompt_tokens(prompt)
        return [b % tok.n_vocab for b in prompt.encode("utf-8")]
    finally:
        tok.close()
