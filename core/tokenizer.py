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
        self.model_dir = model_dir
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

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id, added and special tokens included."""
        return self._tk.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False):
        if self.chat_template is None:
            raise SpecrunError("this model has no chat template; use --raw")
        try:
            text = self._render(messages, add_generation_prompt)
        except SpecrunError:
            raise
        except Exception as exc:  # the template is the model's code: any error it raises is its
            raise SpecrunError(template_error(self.model_dir, exc)) from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _render(self, messages, add_generation_prompt: bool) -> str:
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
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **{
            k: v for k, v in self.special.items() if v is not None})


def template_error(where, exc: BaseException) -> str:
    """The one-line message for a chat template that fails to parse or render (syntax error,
    ``raise_exception``, a sandbox violation, any error of the template's own code)."""
    line = getattr(exc, "lineno", None)
    at = f" at line {line}" if isinstance(line, int) else ""
    detail = (str(exc).strip().splitlines() or [""])[0]
    return (f"the chat template of {where} cannot be rendered{at} ({type(exc).__name__}: {detail}); fix its "
            f"chat_template (tokenizer_config.json or chat_template.jinja), or pass --raw to skip the template")


def render_chat(tok, messages, *, add_generation_prompt: bool = False) -> str:
    """``messages`` in ``tok``'s chat template, as text: the one place the template is applied for
    the decoding path and the training data, so a template that fails is one SpecrunError naming
    the model folder (FastTokenizer and transformers' tokenizers alike)."""
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except SpecrunError:
        raise
    except Exception as exc:
        where = getattr(tok, "model_dir", None) or getattr(tok, "name_or_path", None) or "the model"
        raise SpecrunError(template_error(where, exc)) from None


def check_text(text: str, what: str) -> str:
    """``text``, refused in one line if it cannot be encoded as UTF-8: bytes that were not UTF-8
    (a command-line argument or file decoded with surrogateescape) or a lone surrogate from JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        c = ord(text[exc.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise SpecrunError(f"{what} is not valid UTF-8 text ({bad} at character {exc.start}); "
                           f"give UTF-8 text (e.g. convert it with iconv)") from None
    return text


def vocabulary_difference(a, b) -> str | None:
    """None if tokenizers ``a`` and ``b`` map the same token texts to the same ids (added and
    special tokens included), else what differs, in words."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    ida = {i: t for t, i in va.items()}
    idb = {i: t for t, i in vb.items()}
    for i in sorted(set(ida) | set(idb)):
        if ida.get(i) != idb.get(i):
            return f"token id {i} is {ida.get(i)!r} in one and {idb.get(i)!r} in the other"
    return f"{len(va)} and {len(vb)} tokens"


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
