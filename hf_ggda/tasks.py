"""The user seam: an ``AttributionTask`` turns rows into batches, per-row losses and features.

A task never returns the batch-mean ``.loss`` of a Hugging Face model: every method that feeds
gradients returns one value per row, so that a group's gradient is the gradient of the *sum* of
its members' losses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset
from datasets.fingerprint import Hasher

from .chat import check_chat_tokenizer, encode_chat_rows
from .errors import (
    ColumnTypeError,
    ConfigError,
    EmptyDatasetError,
    LabelError,
    MissingColumnError,
)
from .fingerprint import hash_json
from .logging import get_logger
from .params import find_head
from .validation import (
    check_class_ids,
    check_inputs_fit_model,
    check_labels_fit_head,
    check_model_ready,
    check_no_nulls,
    ensure_dataset,
)

logger = get_logger(__name__)

#: Column holding each row's position in the dataset given by the user.
ROW_COLUMN = "__ggda_row__"
#: Column holding each row's group.
GROUP_COLUMN = "group_id"
#: Columns that preparation passes through unchanged.
PASSTHROUGH = (ROW_COLUMN, GROUP_COLUMN)

Batch = dict[str, torch.Tensor]


def check_columns(dataset: Dataset, columns: Sequence[str], what: str = "dataset") -> None:
    """Raise a clear error if ``dataset`` is not one split, is empty or lacks one of ``columns``.

    Args:
        dataset: The dataset to check.
        columns: Columns that must exist.
        what: How to call the dataset in messages.

    Raises:
        DatasetTypeError: ``dataset`` is a ``DatasetDict``, an ``IterableDataset`` or not a
            ``Dataset`` at all.
        EmptyDatasetError: The dataset has no rows.
        MissingColumnError: A column is absent.
    """
    ensure_dataset(dataset, what)
    for col in columns:
        if col not in dataset.column_names:
            raise MissingColumnError(col, dataset.column_names)
    if len(dataset) == 0:
        raise EmptyDatasetError(what)


def _dtype_of(dataset: Dataset, column: str) -> str:
    feature = dataset.features[column]
    return getattr(feature, "dtype", type(feature).__name__)


class AttributionTask(ABC):
    """What to attribute: how rows become batches, losses, measurements and features.

    Subclasses implement :meth:`prepare`, :meth:`collate` and :meth:`per_row_loss`; the rest
    has defaults. ``feature_columns`` lists the columns :meth:`prepare` produces.
    """

    feature_columns: tuple[str, ...] = ()

    @abstractmethod
    def prepare(self, dataset: Dataset) -> Dataset:
        """Tokenise ``dataset`` through ``Dataset.map`` (cached by fingerprint).

        Args:
            dataset: Raw rows.

        Returns:
            A dataset with ``feature_columns`` plus any passthrough columns.

        Raises:
            DatasetTypeError: Not one ``Dataset`` split (a ``DatasetDict``, a streamed
                ``IterableDataset``...).
            EmptyDatasetError: No rows.
            MissingColumnError: A needed column is absent.
            NullValueError: A text or label column holds None (ready-made tasks).
            LabelError: Labels no loss can use (ready-made tasks).
        """

    @abstractmethod
    def collate(self, columns: Mapping[str, list[Any]]) -> Batch:
        """Turn a slice of prepared columns into padded tensors."""

    @abstractmethod
    def per_row_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return a (B,) vector of per-row training losses (never the batch mean)."""

    def measurement(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return the (B,) query measurement f(q); the loss by default."""
        return self.per_row_loss(model, batch)

    def embed(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return (B, h) mean-pooled last hidden states, for representation grouping."""
        inputs = self.model_inputs(batch)
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    @abstractmethod
    def output_gradient(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (error, features): d loss / d logits and the head's input, per row/token."""

    def check_model(self, model: torch.nn.Module) -> None:
        """Check that ``model`` can be run at all (its weights are loaded).

        Raises:
            ModelStateError: Weights on the ``meta`` device.
        """
        check_model_ready(model)

    def validate(self, prepared: Dataset, model: torch.nn.Module) -> None:
        """Check prepared rows against the model before any pass (call it right after
        :meth:`prepare`): the model's weights are loaded, token ids fit its embeddings and
        rows fit its position embeddings; subclasses add their label checks.

        Args:
            prepared: The output of :meth:`prepare`.
            model: The model the pass will run.

        Raises:
            ModelStateError: Weights on the ``meta`` device.
            ModelInputError: Token ids or row lengths the model cannot embed.
            LabelError: Labels that do not fit the model's head (subclasses).
        """
        self.check_model(model)
        check_inputs_fit_model(prepared, model)

    def model_inputs(self, batch: Batch) -> Batch:
        """Return the entries of ``batch`` that the model's forward takes."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def config_dict(self) -> dict[str, Any]:
        """Return the settings that change the numbers (used in fingerprints)."""
        return {"task": type(self).__name__}

    def fingerprint(self) -> str:
        """Return a hash of :meth:`config_dict`."""
        return hash_json(self.config_dict())


class _TokenizerTask(AttributionTask):
    """Shared machinery of the ready-made tasks (tokenizer, map with explicit fingerprints)."""

    def __init__(self, tokenizer: Any, text_column: str, max_length: int) -> None:
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}.")
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.max_length = max_length
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError("The tokenizer has neither a pad nor an eos token; set one.")
            logger.info("Tokenizer has no pad token; using its eos token for padding.")
            tokenizer.pad_token = tokenizer.eos_token
        self._tok_hash = Hasher.hash(tokenizer)

    def config_dict(self) -> dict[str, Any]:
        return {
            "task": type(self).__name__,
            "text_column": self.text_column,
            "max_length": self.max_length,
            "padding_side": self.tokenizer.padding_side,
            "tokenizer": self._tok_hash,
        }

    def _check_text(self, dataset: Dataset, column: str) -> None:
        if _dtype_of(dataset, column) not in ("string", "large_string"):
            raise ColumnTypeError(
                f"Column {column!r} must hold text (string), but has type "
                f"{dataset.features[column]}. Cast or pick another text column."
            )

    def _map(self, dataset: Dataset, fn: Any, with_indices: bool = False) -> Dataset:
        remove = [c for c in dataset.column_names if c not in PASSTHROUGH]
        new_fp = hash_json([dataset._fingerprint, self.config_dict(), "prepare-v1"])
        return dataset.map(
            fn,
            batched=True,
            with_indices=with_indices,
            remove_columns=remove,
            new_fingerprint=new_fp,
            desc=f"Tokenising for {type(self).__name__}",
        )

    def _logits_and_head_input(self, model: torch.nn.Module,
                               batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: float32 logits and the output layer's input, detached."""
        captured: list[torch.Tensor] = []
        handle = find_head(model).register_forward_hook(
            lambda m, i, o: captured.append(i[0].detach()))
        try:
            logits = model(**self.model_inputs(batch)).logits.detach().float()
        finally:
            handle.remove()
        return logits, captured[-1].float()

    def _pad(self, columns: Mapping[str, list[Any]]) -> Batch:
        feats = {k: columns[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                 if k in columns}
        return dict(self.tokenizer.pad(feats, return_tensors="pt"))


class SequenceClassificationTask(_TokenizerTask):
    """Text (or text-pair) classification or regression with a ``*ForSequenceClassification``.

    Every row's loss counts: negative labels (the ignore index -100 included) and null or
    non-finite labels are refused by :meth:`prepare`, and :meth:`validate` checks the labels
    against the model's head (class ids 0..K-1 for K outputs, floats for one output).

    Args:
        tokenizer: A Hugging Face tokenizer.
        text_column: Column with the text.
        label_column: Column with integer class labels (or floats for regression).
        text_pair_column: Optional second text column.
        max_length: Truncation length in tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: Optional[str] = None,
        max_length: int = 128,
    ) -> None:
        super().__init__(tokenizer, text_column, max_length)
        self.label_column = label_column
        self.text_pair_column = text_pair_column
        self.feature_columns = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def config_dict(self) -> dict[str, Any]:
        cfg = super().config_dict()
        cfg.update(label_column=self.label_column, text_pair_column=self.text_pair_column)
        return cfg

    def prepare(self, dataset: Dataset) -> Dataset:
        cols = [self.text_column, self.label_column]
        if self.text_pair_column:
            cols.append(self.text_pair_column)
        check_columns(dataset, cols)
        for c in cols[:1] + cols[2:]:
            self._check_text(dataset, c)
        ltype = str(_dtype_of(dataset, self.label_column))
        if not (ltype.startswith("int") or ltype.startswith("float") or ltype == "bool"):
            raise ColumnTypeError(
                f"Label column {self.label_column!r} must be integer class ids or floats, got "
                f"{dataset.features[self.label_column]}. Encode labels with "
                "`dataset.class_encode_column(...)`."
            )
        check_no_nulls(dataset, cols)
        check_class_ids(dataset, self.label_column)
        tok, text, pair, label = self.tokenizer, self.text_column, self.text_pair_column, \
            self.label_column
        max_length = self.max_length

        def fn(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
            args = (rows[text], rows[pair]) if pair else (rows[text],)
            enc = dict(tok(*args, truncation=True, max_length=max_length))
            enc.setdefault("token_type_ids", [[0] * len(x) for x in enc["input_ids"]])
            enc["labels"] = rows[label]
            return enc

        return self._map(dataset, fn)

    def validate(self, prepared: Dataset, model: torch.nn.Module) -> None:
        """As :meth:`AttributionTask.validate`, plus the labels against the model's head:
        class ids 0..K-1 for a K-output classifier, float targets for a 1-output
        (regression) head.

        Raises:
            ModelStateError: Weights on the ``meta`` device.
            ModelInputError: Token ids or row lengths the model cannot embed.
            LabelError: Labels of the wrong kind or range for the head.
        """
        super().validate(prepared, model)
        check_labels_fit_head(prepared, model)

    def collate(self, columns: Mapping[str, list[Any]]) -> Batch:
        batch = self._pad(columns)
        labels = torch.tensor(columns["labels"])
        batch["labels"] = labels.long() if not labels.is_floating_point() else labels
        return batch

    def per_row_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits
        labels = batch["labels"]
        if labels.is_floating_point():  # regression
            return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
        return F.cross_entropy(logits, labels, reduction="none")

    def margin(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return (B,) margins: correct logit minus log-sum-exp of the other logits."""
        logits = model(**self.model_inputs(batch)).logits
        labels = batch["labels"]
        correct = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def output_gradient(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, head_input = self._logits_and_head_input(model, batch)
        err = logits.softmax(-1)
        err[torch.arange(len(err)), batch["labels"]] -= 1.0
        return err, head_input


class CausalLMTask(_TokenizerTask):
    """Causal language modelling; the loss covers target tokens only (labels -100 masked).

    Either ``text_column`` (every token is a target), ``prompt_column`` + ``response_column``
    (only response tokens are targets; an eos token is appended to a string response; lists
    of messages in both, TRL's conversational prompt/completion, go through the chat
    template), or ``messages_column`` (chat rows through the tokenizer's chat template, every
    non-assistant token masked; see :mod:`hf_ggda.chat`).

    Args:
        tokenizer: A Hugging Face tokenizer.
        text_column: Column with full texts (used when no prompt/response columns).
        prompt_column: Column with prompts (not trained on).
        response_column: Column with responses (trained on).
        max_length: Truncation length in tokens.
        reduction: ``"mean"`` or ``"sum"`` of a row's target-token losses.
        messages_column: Column of chat ``messages`` (role/content dicts).

    Raises:
        ConfigError: (a ``ValueError``) Bad reduction or column combination.
        ChatFormatError: Chat rows with a tokenizer that has no chat template.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        prompt_column: Optional[str] = None,
        response_column: Optional[str] = None,
        max_length: int = 128,
        reduction: str = "mean",
        messages_column: Optional[str] = None,
    ) -> None:
        super().__init__(tokenizer, text_column, max_length)
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        if (prompt_column is None) != (response_column is None):
            raise ConfigError("Pass both prompt_column and response_column, or neither.")
        if messages_column is not None and prompt_column is not None:
            raise ConfigError("Pass messages_column or prompt_column/response_column, not both.")
        if messages_column is not None:
            check_chat_tokenizer(tokenizer)
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.messages_column = messages_column
        self.reduction = reduction
        self.feature_columns = ("input_ids", "attention_mask", "labels")

    def config_dict(self) -> dict[str, Any]:
        cfg = super().config_dict()
        cfg.update(prompt_column=self.prompt_column, response_column=self.response_column,
                   reduction=self.reduction)
        if self.messages_column is not None or self.prompt_column is not None:
            cfg.update(messages_column=self.messages_column,
                       chat_template=hash_json(getattr(self.tokenizer, "chat_template", None)))
        return cfg

    def _prepare_chat(self, dataset: Dataset) -> Dataset:
        """Chat rows (messages, or conversational prompt/completion) through the template."""
        check_chat_tokenizer(self.tokenizer)
        tok, max_length = self.tokenizer, self.max_length
        cols = (self.messages_column, self.prompt_column, self.response_column)
        check_columns(dataset, [c for c in cols if c is not None])

        def fn(rows: dict[str, list[Any]], idx: list[int]) -> dict[str, list[Any]]:
            return encode_chat_rows(tok, rows, max_length, *cols, offset=idx[0])

        out = self._map(dataset, fn, with_indices=True)
        self._check_targets(out)
        return out

    def prepare(self, dataset: Dataset) -> Dataset:
        cols = [self.text_column]
        if self.prompt_column:
            assert self.response_column is not None  # __init__ takes both or neither
            cols = [self.prompt_column, self.response_column]
        check_columns(dataset, [self.messages_column] if self.messages_column else cols)
        if self.messages_column is not None or (
                self.prompt_column is not None and
                isinstance(dataset[0][self.prompt_column], list)):
            return self._prepare_chat(dataset)
        for c in cols:
            self._check_text(dataset, c)
        check_no_nulls(dataset, cols)
        tok, max_length = self.tokenizer, self.max_length
        prompt, response, text = self.prompt_column, self.response_column, self.text_column
        eos = tok.eos_token or ""

        def fn(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
            if prompt is None:
                enc = tok(rows[text], truncation=True, max_length=max_length)
                labels = [list(ids) for ids in enc["input_ids"]]
            else:
                assert response is not None  # __init__ takes both or neither
                full = [p + r + eos for p, r in zip(rows[prompt], rows[response])]
                enc = tok(full, truncation=True, max_length=max_length)
                n_prompt = [len(x) for x in tok(rows[prompt])["input_ids"]]
                labels = [[-100] * min(k, len(ids)) + list(ids[k:])
                          for k, ids in zip(n_prompt, enc["input_ids"])]
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": labels}

        out = self._map(dataset, fn)
        self._check_targets(out)
        return out

    @staticmethod
    def _check_targets(dataset: Dataset) -> None:
        empty = [i for i, lab in enumerate(dataset["labels"])
                 if sum(1 for t in lab[1:] if t != -100) == 0]
        if empty:
            raise LabelError(
                f"Rows {empty[:20]} have no target tokens after truncation, so their loss is "
                "undefined. Increase max_length, shorten the prompts, or drop these rows."
            )

    def collate(self, columns: Mapping[str, list[Any]]) -> Batch:
        batch = self._pad(columns)
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(columns["labels"]), width), -100, dtype=torch.long)
        for i, lab in enumerate(columns["labels"]):
            lab_t = torch.tensor(lab, dtype=torch.long)
            if self.tokenizer.padding_side == "left":
                labels[i, width - len(lab):] = lab_t
            else:
                labels[i, : len(lab)] = lab_t
        batch["labels"] = labels
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    def _token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shift_logits = logits[:, :-1]
        if shift_logits.dtype in (torch.float16, torch.bfloat16):
            shift_logits = shift_logits.float()
        shift_labels = labels[:, 1:]
        losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                 ignore_index=-100, reduction="none")
        return losses

    def per_row_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits
        losses = self._token_losses(logits, batch["labels"]).to(logits.dtype)
        total = losses.sum(1)
        if self.reduction == "sum":
            return total
        count = (batch["labels"][:, 1:] != -100).sum(1).clamp(min=1)
        return total / count

    def output_gradient(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, head_input = self._logits_and_head_input(model, batch)
        labels = batch["labels"][:, 1:]
        err = logits[:, :-1].softmax(-1)
        mask = labels != -100
        err.scatter_add_(-1, labels.clamp(min=0)[..., None],
                         -mask[..., None].to(err.dtype))
        weight = mask.to(err.dtype)
        if self.reduction == "mean":
            weight = weight / mask.sum(1, keepdim=True).clamp(min=1)
        err = err * weight[..., None]
        return err, head_input[:, :-1]
