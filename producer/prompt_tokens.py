"""Count prompt tokens at submit with the `tokenizers` library and jinja2, never torch or
transformers: the API process stays small and its first submit does not load a deep-learning
stack. It reads what the engine's loader cached for the model (tokenizer.json, the chat
template); only a model not converted yet goes once through the engine's loader to make it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# As engine.model_loader: the test models and the echo engine borrow the bundled tokenizer.
BUNDLED_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PromptTokenizer:
    tokenizer: Tokenizer
    chat_template: Any  # a compiled jinja2 template, None when the model has none
    special_tokens: dict[str, str]  # bos_token, eos_token… as the template may use them

    def count(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt).ids)

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the messages rendered as the engine renders them (generation prompt on)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template: send a prompt")
        text = self.chat_template.render(messages=messages, add_generation_prompt=True,
                                         **self.special_tokens)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _raise(message: str) -> None:
    raise ValueError(message)


# The environment transformers renders chat templates in.
_TEMPLATES = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=["jinja2.ext.loopcontrols"])
_TEMPLATES.globals["raise_exception"] = _raise


def cached_directory(model: str, cache_dir: Path) -> Path:
    """Where the engine's loader caches `model`'s tokenizer (engine.model_loader's naming)."""
    if model.startswith("dummy:") or model == "echo":
        model = BUNDLED_MODEL
    name = Path(model).stem if model.endswith(".gguf") else model
    return cache_dir / name


# Conversions one at a time: threads importing transformers at once can see a half-imported
# module ("cannot import name ..."), which answered an API's first submits with a 500.
_CONVERSION_LOCK = threading.Lock()


@cache
def load_prompt_tokenizer(model: str, cache_dir: Path) -> PromptTokenizer:
    """One per model, cache dir and process. Two first requests racing may both read the
    files (harmless); only the one-time conversion is serialized."""
    directory = cached_directory(model, cache_dir)
    if not (directory / "tokenizer.json").is_file():
        with _CONVERSION_LOCK:
            if not (directory / "tokenizer.json").is_file():
                from engine import load_tokenizer  # converts once (GGUF → tokenizer files)

                load_tokenizer(model, cache_dir=cache_dir)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    template_file = directory / "chat_template.jinja"
    template = (template_file.read_text() if template_file.is_file()
                else config.get("chat_template"))
    special = {name: value for name, value in config.items()
               if name.endswith("_token") and isinstance(value, str)}
    return PromptTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")),
                           None if template is None else _TEMPLATES.from_string(template),
                           special)
