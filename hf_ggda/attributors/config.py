"""``AttributorConfig``: the settings every attributor shares (its subclasses add their own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..config import ConfigMixin
from ..errors import ConfigError
from ..gradients.engine import EngineConfig
from .normalise import check_normalize


@dataclass
class AttributorConfig(ConfigMixin):
    """Settings shared by every attributor (JSON and command-line support from
    :class:`~hf_ggda.config.ConfigMixin`).

    Attributes:
        attributor_type: Registered name of the method (set by each subclass).
        batch_size: Rows per forward/backward pass (does not change results).
        selection: Parameters to attribute through ("auto", "peft", "trainable" or names /
            regular expressions).
        shard_rows: Target rows per gradient-store shard.
        memory_budget: Bytes the gradient blocks may take beyond the model's forward+backward
            (a store shard, a chunk of query gradients and their scores); None: shards of at
            most 64 MB of unprojected vectors and all queries at once.
        factorised_dim: Project every tracked linear layer's gradient inside the hooks to a
            k × k block (k per side; :mod:`hf_ggda.gradients.factorised`); None: off. Makes
            full-layer and LLM-size attribution fit in memory (replaces a dense projection).
        store_dtype: dtype of the vectors in a gradient store (``"float16"`` / ``"bfloat16"``
            halve the disk; accumulation stays fp32); None: the accumulation dtype.
        normalize: ``"unit"`` / ``"preconditioned"``: divide every training and query row's
            gradient by its norm before it enters a group sum, so normalised scores stay
            additive over groups (:mod:`hf_ggda.attributors.normalise`); None: raw scores.
        strict: Raise instead of warning when the classifier has not learned
            (:mod:`hf_ggda.learning_check`) or the model is in train mode.
    """

    attributor_type: str = field(default="", metadata={"help": "Registered method name."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward/backward pass."})
    selection: Union[str, list[str]] = field(
        default="auto", metadata={"help": "'auto', 'peft', 'trainable' or parameter names."})
    shard_rows: int = field(default=512, metadata={"help": "Target rows per store shard."})
    memory_budget: Optional[int] = field(default=None, metadata={
        "help": "Bytes for gradient blocks beyond the model's own pass: sizes store shards "
                "and query chunks (None: 64 MB shards, all queries at once)."})
    factorised_dim: Optional[int] = field(default=None, metadata={
        "help": "Factorised projection: k per side of every linear layer (None = off)."})
    store_dtype: Optional[str] = field(default=None, metadata={
        "help": "Store vectors as 'float16' or 'bfloat16' (None: the accumulation dtype)."})
    normalize: Optional[str] = field(default=None, metadata={
        "help": "'unit' or 'preconditioned': normalise each row before the group sum."})
    strict: bool = field(default=False, metadata={
        "help": "Turn warnings (a classifier that has not learned, train mode) into errors."})

    def __post_init__(self) -> None:
        expected = type(self).__dataclass_fields__["attributor_type"].default
        if self.attributor_type != expected:
            raise ValueError(f"{type(self).__name__} has attributor_type {expected!r}, got "
                             f"{self.attributor_type!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}.")
        if self.memory_budget is not None and self.memory_budget < 1 << 20:
            raise ValueError(f"memory_budget must be at least 1 MB (bytes), got "
                             f"{self.memory_budget}.")
        if self.factorised_dim is not None and self.factorised_dim < 1:
            raise ValueError(f"factorised_dim must be >= 1 or None, got {self.factorised_dim}.")
        EngineConfig(store_dtype=self.store_dtype)  # validates it
        check_normalize(self.normalize)
        if not isinstance(self.selection, (str, list, tuple)) or not self.selection:
            raise ValueError(f"selection must be a non-empty string or list, got "
                             f"{self.selection!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AttributorConfig":
        """Build a config from plain data; on the base class, the method's config class is
        looked up from ``attributor_type`` in the registry.

        Raises:
            ConfigError: (a ``ValueError``) Unknown attributor type or unknown keys.
        """
        target: type[AttributorConfig] = cls
        if cls is AttributorConfig:
            from .registry import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING

            kind = data.get("attributor_type", "") if isinstance(data, Mapping) else ""
            if not isinstance(kind, str) or kind not in ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING:
                raise ConfigError(f"Unknown attributor_type {kind!r:.80}; registered: "
                                  f"{sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING)}. Pass one of "
                                  "them.")
            target = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[kind]
        return super(AttributorConfig, target).from_dict(dict(data))
