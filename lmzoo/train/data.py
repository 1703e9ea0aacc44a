"""Training data: JSONL of chat `messages`, `prompt`/`response` pairs, or plain `text`.

Chat data goes through the model's chat template. The loss falls on what the assistant says
(label -100 everywhere else), or on every token for `text`. Every problem with the file is
reported as file:line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

from ..errors import LmzooError

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where the token is context, not a target
    prompt: list[int] | None = None  # chat: the tokens before the last answer, for exact match
    answer: str | None = None  # chat: the last assistant message


@dataclass
class DataReport:
    examples: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    truncated: int = 0

    def __str__(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.skipped_lines:
            parts.append(f"{len(self.skipped_lines)} bad lines skipped (lines {self.skipped_lines[:10]})")
        if self.truncated:
            parts.append(f"{self.truncated} examples truncated to the context")
        return ", ".join(parts)


def read_jsonl(path: str, *, skip_bad_lines: bool = False, report: DataReport | None = None) -> list[dict]:
    """Parsed records; a bad line is an error naming path:line, or skipped and counted."""
    return [record for _, record in _numbered_records(path, skip_bad_lines, report)]


def _numbered_records(path: str, skip_bad_lines: bool, report: DataReport | None) -> list[tuple[int, dict]]:
    records = []
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by the `with f:` below; only opening is guarded)
    except OSError as e:
        raise LmzooError(f"{path}: cannot open data file: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as some editors write
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                record = json.loads(_utf8(raw), parse_constant=_no_constant)
                check_record(record)
            except RecursionError:
                raise LmzooError(f"{path}:{n}: JSON nested too deeply") from None
            except (json.JSONDecodeError, ValueError) as e:
                if not skip_bad_lines:
                    raise LmzooError(f"{path}:{n}: {e} (use --skip-bad-lines to skip such lines)") from None
                if report is not None:
                    report.skipped_lines.append(n)
                continue
            records.append((n, record))
    if not records:
        raise LmzooError(f"{path}: the dataset is empty (no usable JSONL lines)")
    return records


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def check_record(record) -> None:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object per line")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError('"messages" has no assistant turn to learn from')
    elif "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise ValueError('expected string fields "prompt" and "response"')
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
    else:
        raise ValueError('expected "messages", "prompt"/"response" or "text"')


def encode_record(record: dict, tokenizer) -> Example:
    """Token ids and labels: loss on assistant turns (chat) or on every token (text)."""
    if "text" in record and "messages" not in record and "prompt" not in record:
        ids = tokenizer.encode_plain(record["text"])  # a data file's text is text, never control tokens
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        return Example(ids, list(ids))
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                          {"role": "assistant", "content": record["response"]}]
    if tokenizer.chat_template is None:  # no template: prompt and response back to back
        context = tokenizer.encode_plain("".join(m["content"] for m in messages[:-1]))
        answer = tokenizer.encode_plain(messages[-1]["content"], add_special_tokens=False) + [tokenizer.eos_id]
        return Example(context + answer, [IGNORE] * len(context) + answer, context, messages[-1]["content"])
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The rendering up to this turn's header is context; from there to the end of the turn, target.
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if before[:len(ids)] != ids or through[:len(before)] != before:
            raise LmzooError("the chat template does not render turns as prefixes of each other; "
                             "use prompt/response data or text")
        labels += [IGNORE] * (len(before) - len(ids)) + through[len(before):]
        ids = through
        prompt, answer = before, m["content"]
    return Example(ids, labels, prompt, answer)


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    return tokenizer.encode_chat(messages, add_generation_prompt=generation_prompt)


def load_examples(path: str, tokenizer, max_len: int, *, skip_bad_lines: bool = False,
                  too_long: str = "truncate", report: DataReport | None = None) -> list[Example]:
    report = report if report is not None else DataReport()
    examples = []
    for n, record in _numbered_records(path, skip_bad_lines, report):
        try:
            ex = encode_record(record, tokenizer)
        except LmzooError as e:  # the record is well-formed, but the tokenizer or template cannot take it
            if not skip_bad_lines:
                raise LmzooError(f"{path}:{n}: {e}") from None
            report.skipped_lines.append(n)
            continue
        if len(ex.ids) > max_len:
            if too_long == "refuse":
                raise LmzooError(f"{path}: an example has {len(ex.ids)} tokens, more than the context of "
                                 f"{max_len} (use --too-long truncate)")
            ex = Example(ex.ids[:max_len], ex.labels[:max_len], ex.prompt, ex.answer)
            report.truncated += 1
        if any(label != IGNORE for label in ex.labels[1:]):
            examples.append(ex)
    report.examples = len(examples)
    if not examples:
        raise LmzooError(f"{path}: no example has a token to learn from")
    return examples


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic train/validation split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(examples) * val_fraction))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def pack(examples: list[Example], length: int) -> list[Example]:
    """Concatenate examples into rows of `length` tokens (fewer, fuller batches)."""
    rows, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.ids) > length:
            rows.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + ex.ids, labels + [IGNORE] + ex.labels[1:]  # never predict across examples
    if ids:
        rows.append(Example(ids, labels))
    return rows


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into tensors: input_ids, labels (IGNORE on padding), attention_mask."""
    T = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.ids)
        ids[i, :n] = torch.tensor(ex.ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int):
    """The examples of one epoch in a shuffled order that depends only on (seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]
