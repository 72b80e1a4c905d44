"""Chat-formatted and prompt/completion rows for :class:`~hf_ggda.tasks.CausalLMTask`.

Two formats, as in the Hugging Face fine-tuning stack (TRL):

* **conversational** ``messages``: a list of ``{"role": ..., "content": ...}`` turns. The
  row is rendered with the tokenizer's chat template; only the assistant turns are targets
  (their content and what the template puts after it up to the next turn, e.g. an
  end-of-turn token); system, user and tool turns and every template header get label −100.
* **prompt / completion**: ``prompt`` and ``completion`` columns holding either strings (the
  prompt is masked, the completion + eos is the target; the task's ``prompt_column`` /
  ``response_column`` path) or lists of messages (conversational prompt and completion: the
  two are rendered as one conversation and only the completion's assistant turns are
  targets).

How the masking is found: for the assistant turn j, the rendered text of turns < j with the
generation prompt (``add_generation_prompt=True``) must be a prefix of the whole rendering;
the characters between that prefix and the rendering of turns ≤ j are the turn's target
characters, and a token is a target when its character span (the fast tokenizer's offset
mapping) starts inside them. A template that does not render prefixes consistently is refused
(:class:`~hf_ggda.errors.ChatFormatError`) instead of being masked wrongly.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import ChatFormatError

ROLES = ("system", "user", "assistant", "tool")


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer that cannot render or locate chat turns.

    Raises:
        ChatFormatError: No chat template, or not a fast tokenizer (no offset mapping).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError(
            "The tokenizer has no chat template, so chat rows cannot be rendered. Load the "
            "tokenizer of a chat/instruct model, set tokenizer.chat_template, or give plain "
            "prompt/response string columns instead.")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError("Chat masking needs a fast tokenizer (offset mappings); load it "
                              "with use_fast=True.")


def _check_messages(messages: Any, row: int, column: str) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"Row {row}: column {column!r} must hold a non-empty list of "
                              f"messages, got {type(messages).__name__}.")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise ChatFormatError(
                f"Row {row}, message {k} of {column!r}: each message needs a 'role' in {ROLES} "
                f"and a string 'content', got {m!r:.120}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation: bool) -> str:
    if not messages:
        return ""
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation))


def target_spans(tokenizer: Any, messages: Sequence[dict[str, str]], first_target: int,
                 row: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its target assistant turns.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: Checked messages.
        first_target: Assistant turns before this message index are not targets (the
            prompt of a prompt/completion row).
        row: Row index, for messages.

    Returns:
        (text, [(start, end), ...]).

    Raises:
        ChatFormatError: No assistant turn to train on, or an inconsistent template.
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant" or j < first_target:
            continue
        head = _render(tokenizer, messages[:j], True)
        upto = _render(tokenizer, messages[:j + 1], False)
        if not text.startswith(head) or not text.startswith(upto) or len(upto) < len(head):
            raise ChatFormatError(
                f"Row {row}: the chat template does not render turn {j}'s prefix as a prefix "
                "of the whole conversation, so its assistant tokens cannot be located. Use a "
                "template whose renderings of leading turns are prefixes (most are), or "
                "prompt/response string columns.")
        spans.append((len(head), len(upto)))
    if not spans:
        raise ChatFormatError(f"Row {row} has no assistant turn to train on (roles: "
                              f"{[m['role'] for m in messages]}); every chat row needs one. "
                              "Drop the row or add the assistant's answer.")
    return text, spans


def encode_chat(tokenizer: Any, messages: Any, max_length: int, row: int = 0,
                column: str = "messages", first_target: int = 0
                ) -> tuple[list[int], list[int], list[int]]:
    """Token ids, attention mask and labels (−100 outside assistant turns) of one chat row.

    Raises:
        ChatFormatError: Malformed messages, no assistant turn, or an inconsistent template.
    """
    checked = _check_messages(messages, row, column)
    text, spans = target_spans(tokenizer, checked, first_target, row)
    enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if any(a <= start < b for a, b in spans) else -100
              for tok, (start, _end) in zip(ids, enc["offset_mapping"])]
    return ids, list(enc["attention_mask"]), labels


def encode_chat_rows(tokenizer: Any, rows: dict[str, list[Any]], max_length: int,
                     messages_column: str | None, prompt_column: str | None,
                     response_column: str | None, offset: int = 0) -> dict[str, list[Any]]:
    """Encode a batch of chat rows (``messages``, or conversational prompt + completion).

    Raises:
        ChatFormatError: As :func:`encode_chat`.
    """
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    if messages_column is not None:
        convs = [(m, 0) for m in rows[messages_column]]
        column = messages_column
    else:
        assert prompt_column is not None and response_column is not None
        convs = []
        for k, (p, c) in enumerate(zip(rows[prompt_column], rows[response_column])):
            prompt = _check_messages(p, offset + k, prompt_column)
            convs.append((prompt + _check_messages(c, offset + k, response_column),
                          len(prompt)))
        column = f"{prompt_column} + {response_column}"
    for k, (messages, first) in enumerate(convs):
        ids, mask, labels = encode_chat(tokenizer, messages, max_length, offset + k, column,
                                        first)
        out["input_ids"].append(ids)
        out["attention_mask"].append(mask)
        out["labels"].append(labels)
    return out
