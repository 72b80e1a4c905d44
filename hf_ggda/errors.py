"""Typed errors of hf_ggda.

Every error names the problem and says how to fix it. Each subclasses the built-in exception
that fits (``ValueError`` for bad input, ``RuntimeError`` for bad state, ``FileNotFoundError``
for missing stores, ``OSError`` subclasses for store folders that cannot be used as asked,
``FloatingPointError`` for non-finite numbers) so callers can catch either.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class GGDAError(Exception):
    """Base class of all hf_ggda errors."""


class EmptyDatasetError(GGDAError, ValueError):
    """A dataset has no rows."""

    def __init__(self, what: str = "dataset") -> None:
        super().__init__(
            f"The {what} is empty (0 rows). Pass a dataset with at least one row; "
            "check filters or splits that may have removed every row."
        )


class MissingColumnError(GGDAError, ValueError):
    """A column the configuration needs is absent."""

    def __init__(self, column: str, available: Iterable[str], role: str = "column") -> None:
        self.column = column
        self.available = list(available)
        super().__init__(
            f"Missing {role} {column!r}: the dataset has columns {self.available}. "
            f"Rename a column with `dataset.rename_column(old, {column!r})` or pass the "
            "right column name in the task/grouper config."
        )


class ColumnTypeError(GGDAError, ValueError):
    """A column has the wrong type."""


class GroupingError(GGDAError, ValueError):
    """Grouping cannot be done as asked (K < 1, K > n, classes too small, nulls...)."""


class RowAlignmentError(GroupingError):
    """Per-row results cannot be placed on a dataset: its rows are not the attributed or scored
    ones (another order or subset without a row-key column, or unknown keys)."""


class NoParametersError(GGDAError, ValueError):
    """The parameter selection matched nothing."""

    def __init__(self, how: str, names: Sequence[str]) -> None:
        names = list(names)
        if len(names) > 20:
            shown = f"{names[:10]} ... ({len(names) - 20} more) ... {names[-10:]}"
        else:
            shown = str(names)
        super().__init__(
            f"No parameters selected by {how}. The model has these parameters: {shown}. "
            "Attach a PEFT adapter (e.g. peft.get_peft_model with a LoraConfig), unfreeze "
            "parameters and use selection='trainable', or pass names/regex that match."
        )


class PartialSelectionWarning(UserWarning):
    """Some requested parameter names matched nothing."""


class NonFiniteError(GGDAError, FloatingPointError):
    """A loss or gradient is NaN or infinite."""

    def __init__(self, what: str, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        shown = self.rows[:20]
        super().__init__(
            f"Non-finite {what} (NaN or Inf) for dataset rows {shown}"
            f"{' ...' if len(self.rows) > 20 else ''}. Inspect or drop these rows "
            "(`dataset.select(...)`), lower the learning rate of the checkpoint, or run the "
            "model in float32."
        )


class NonFiniteScoresError(NonFiniteError):
    """Finite gradients gave NaN or infinite scores: their products overflowed the dtype (e.g.
    float32 beyond 3.4e38), or a preconditioner with too little damping blew up."""

    def __init__(self, rows: Sequence[int], groups: Sequence[object], dtype: str,
                 what: str = "Scores of query rows") -> None:
        self.rows = list(rows)
        self.groups = list(groups)
        shown_rows = f"{self.rows[:20]}{' ...' if len(self.rows) > 20 else ''} against " \
            if self.rows else ""
        GGDAError.__init__(
            self,
            f"{what} {shown_rows}groups {self.groups[:10]}"
            f"{' ...' if len(self.groups) > 10 else ''} are "
            f"NaN or infinite although the gradients are finite: the products overflowed "
            f"{dtype}, or the preconditioner blew up. Compute in float64 (`model.double()`), "
            "pass normalize='unit' (bounded, cosine-like scores), or raise the damping; no "
            "scores were returned.")


class ModelNotLearnedWarning(UserWarning):
    """The attributed classifier predicts (nearly) a constant: its attributions rank nothing
    better than chance-level signals."""


class ModelNotLearnedError(GGDAError, RuntimeError):
    """Strict mode: the attributed classifier has not learned (see
    :class:`ModelNotLearnedWarning`)."""


class NotFittedError(GGDAError, RuntimeError):
    """``score`` was called before ``fit``."""


class StoreNotFoundError(GGDAError, FileNotFoundError):
    """A path is not a gradient store."""


class StoreMismatchError(GGDAError, ValueError):
    """A store was made for another model, data or config."""

    def __init__(self, path: str, saved: dict, requested: dict) -> None:
        self.saved = saved
        self.requested = requested
        diff = {
            k: {"saved": saved.get(k), "requested": requested.get(k)}
            for k in sorted(set(saved) | set(requested))
            if saved.get(k) != requested.get(k)
        }
        super().__init__(
            f"The gradient store at {path!r} was made for a different request; differing "
            f"fields (saved vs requested): {diff}. Use another store path, or pass "
            "overwrite=True to replace it."
        )


class CorruptShardError(GGDAError, RuntimeError):
    """A store shard cannot be read."""


class StorePathError(GGDAError, NotADirectoryError):
    """A store path is a file (or lies under one), not a folder."""


class StoreFolderNotEmptyError(GGDAError, FileExistsError):
    """A store folder holds files the store did not write; they are never touched."""


class ManifestError(GGDAError, ValueError):
    """A store manifest cannot be trusted: bad JSON, an unknown format version, or fields that
    fail the schema or no longer match the manifest's own hash (edited by hand)."""


class StoreLockedError(GGDAError, TimeoutError):
    """Another process held a store's lock for longer than the lock timeout."""


class StoreReadOnlyError(GGDAError, PermissionError):
    """A store must be written (it is incomplete or being replaced) but its folder is read-only."""


class StoreChangedError(GGDAError, RuntimeError):
    """Another process replaced a store while this one was writing or reading it."""


class TokenizationMismatchError(GGDAError, ValueError):
    """Query and train data were prepared differently."""


class ConfigError(GGDAError, ValueError):
    """A config cannot be used as given: an unknown (mistyped) key, a non-finite number, a
    config file that is not valid JSON or holds another config class."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field got a value of the wrong type (a string for an int, a list for a str...)."""


class DatasetTypeError(GGDAError, TypeError):
    """Something other than one ``datasets.Dataset`` split was passed where one is needed (a
    ``DatasetDict``, an ``IterableDataset``, a pandas frame...)."""


class NullValueError(GGDAError, ValueError):
    """A text or label column holds None / null values."""


class LabelError(GGDAError, ValueError):
    """Labels do not fit the task or the model's head (out of range, negative, -100 on a
    classifier, float labels on a classifier, class ids for a 1-output head...)."""


class ModelInputError(GGDAError, ValueError):
    """Prepared inputs do not fit the model: token ids beyond its embedding table (tokenizer
    and model do not match), or rows longer than its position embeddings."""


class ModelStateError(GGDAError, RuntimeError):
    """The model cannot be run as it is (e.g. its weights are on the ``meta`` device)."""


class ModelChangedError(GGDAError, RuntimeError):
    """The model's weights changed since :meth:`~hf_ggda.attributors.Attributor.fit`: new query
    gradients would be mixed with the training vectors of the old weights."""


class ScoresFileError(GGDAError, ValueError):
    """A saved ``GroupScores`` folder cannot be trusted: bad JSON, an unknown format version,
    fields that fail the schema, or lengths that do not match the saved matrix."""


class CheckpointManifestError(GGDAError, ValueError):
    """A checkpoint list read back (``ggda_checkpoints.json``, ``trainer_state.json``) cannot be
    trusted: bad JSON, fields that fail the schema, or a path that leaves its folder."""


class OutputPathError(GGDAError, ValueError):
    """An output path cannot be used: it is a file, or writing it would overwrite an input."""


class DataFileError(GGDAError, ValueError):
    """A data file or folder given on the command line cannot be read as a dataset."""


class ModelLoadError(GGDAError, ValueError):
    """A model (or adapter) folder given on the command line cannot be loaded."""


class ChatFormatError(GGDAError, ValueError):
    """Chat-formatted rows cannot be encoded: no chat template, malformed ``messages``, no
    assistant turn to train on, or a template whose prefixes are not prefixes of the whole."""


class RunFolderError(GGDAError, ValueError):
    """A folder that is not a run the viewer can open (no training rows, no groups, no queries)."""
