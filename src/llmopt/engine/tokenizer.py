"""The model folder's tokenizer and chat template, and the stop tokens from config/generation_config.

Reads ``tokenizer.json``/``tokenizer_config.json`` (and ``chat_template.jinja``/``.json`` when present) through
``transformers.AutoTokenizer`` from local files only. ``StreamDecoder`` turns a growing token list into text
pieces for streaming, holding back incomplete UTF-8 sequences.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.engine.config import ModelArgs
from llmopt.errors import LlmoptError


class Tokenizer:
    def __init__(self, folder: Path, args: ModelArgs):
        self.folder, self.args = Path(folder), args
        if not (self.folder / "tokenizer.json").is_file() and not (self.folder / "tokenizer.model").is_file():
            raise LlmoptError(f"{self.folder}: no tokenizer.json or tokenizer.model (text prompts need the tokenizer; "
                              "pass token ids instead)")
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as err:  # transformers raises many types; report them in one line
            raise LlmoptError(f"{self.folder}: tokenizer files could not be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, user_text: str, n_images: int = 0, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat prompt (with the generation prompt), ``n_images`` image slots first."""
        if not self.has_chat_template:
            raise LlmoptError(f"{self.folder}: the tokenizer has no chat template (use a plain prompt)")
        # plain string content when there are no images: every template accepts it, not all accept part lists
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": user_text}] if n_images else user_text
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id else int(tid)

    def stop_ids(self) -> set[int]:
        """End-of-sequence ids: config.json, generation_config.json, the tokenizer's eos and end-of-turn tokens."""
        ids = set(self.args.eos_token_ids)
        gen = self.folder / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                raise LlmoptError(f"{gen}: not valid JSON") from None
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.add(int(self.hf.eos_token_id))
        for token in ("<end_of_turn>", "<|im_end|>", "<|endoftext|>"):
            tid = self.token_id(token)
            if tid is not None:
                ids.add(tid)
        return ids


class StreamDecoder:
    """Incremental detokenization: ``push(token) -> new text`` (decoding the whole tail keeps spacing right)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new
