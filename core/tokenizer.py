"""A light tokenizer for the decoding path: the `tokenizers` library plus the model's Jinja chat
template, as transformers renders it, without importing transformers (which pulls in torch: ~4 s
and ~300 MB before the first token).  Falls back to transformers' AutoTokenizer for folders
without a tokenizer.json."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import SpecrunError


class FastTokenizer:
    """The subset of transformers' tokenizer API specrun uses: encode, decode, apply_chat_template,
    eos_token_id, chat_template."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        try:
            self._tk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            config = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").exists() else {}
        except Exception as exc:
            raise SpecrunError(f"cannot load the tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from None
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = config.get("chat_template")
        if (model_dir / "chat_template.jinja").exists():
            template = (model_dir / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled = None

    @property
    def eos_token_id(self) -> int | None:
        tok = self.special.get("eos_token")
        return None if tok is None else self._tk.token_to_id(tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False):
        if self.chat_template is None:
            raise SpecrunError("this model has no chat template; use --raw")
        if self._compiled is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **{
            k: v for k, v in self.special.items() if v is not None})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        return value.get("content")
    return value


def load_tokenizer(model_dir, *, full: bool = False):
    """The fast tokenizer when the folder has a tokenizer.json (and ``full`` is not asked),
    else transformers' AutoTokenizer (padding, batching: what training needs)."""
    if not full and (Path(model_dir) / "tokenizer.json").exists():
        return FastTokenizer(Path(model_dir))
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types here
        raise SpecrunError(f"cannot load the tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from None
