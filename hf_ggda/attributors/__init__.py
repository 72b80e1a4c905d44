"""Attribution methods: GGDA-TracIn, GGDA-Influence and GGDA-TRAK, with a registry.

Example::

    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction

    attributor = InfluenceFunction(model, task, InfluenceConfig(preconditioner="ekfac",
                                                                damping=1e-3))
    attributor.fit(train, group_column="group_id", store="ggda-store")
    scores = attributor.score(queries)               # GroupScores, m × K
    train = scores.to_dataset_columns(train)         # ggda_group_score, ggda_group_rank, ...
"""

from .base import Attributor, AttributorConfig, Component
from .checkpoints import Checkpoint, trainer_checkpoints
from .influence import InfluenceConfig, InfluenceFunction
from .registry import (
    ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING,
    ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING,
    get_attributor,
    get_attributor_config,
    register_attributor,
)
from .tabular import TensorTask
from .tokens import TokenScores, token_scores
from .tracin import TracIn, TracInConfig
from .trak import TRAK, TRAKConfig, causal_lm_margin

__all__ = [
    "ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING",
    "ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING",
    "TRAK",
    "Attributor",
    "AttributorConfig",
    "Checkpoint",
    "Component",
    "InfluenceConfig",
    "InfluenceFunction",
    "TRAKConfig",
    "TensorTask",
    "TokenScores",
    "TracIn",
    "TracInConfig",
    "causal_lm_margin",
    "get_attributor",
    "get_attributor_config",
    "register_attributor",
    "token_scores",
    "trainer_checkpoints",
]
