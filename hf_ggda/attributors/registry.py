"""Registry of attribution methods, in the style of PEFT's ``PEFT_TYPE_TO_CONFIG_MAPPING``.

Each method registers its config class and attributor class under a name
(``register_attributor``); ``get_attributor`` builds one from a name, a config dict or a
config object.

This module sits below :mod:`hf_ggda.attributors.base`: it holds the mappings and imports the
base classes for annotations only, so ``base`` can look a method's config class up here
(``AttributorConfig.from_dict``) without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Union

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Attributor, AttributorConfig

#: Method name -> config class.
ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING: dict[str, type["AttributorConfig"]] = {}
#: Method name -> attributor class.
ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING: dict[str, type["Attributor"]] = {}


def register_attributor(name: str, config_cls: type["AttributorConfig"],
                        attributor_cls: type["Attributor"]) -> None:
    """Register a method.

    Args:
        name: The method name (the config's ``attributor_type``).
        config_cls: Its config dataclass.
        attributor_cls: Its attributor class.

    Raises:
        ValueError: ``name`` is taken by other classes, or the config's default
            ``attributor_type`` is not ``name``.
    """
    known = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.get(name)
    if known is not None and (known is not config_cls or
                              ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING[name] is not attributor_cls):
        raise ValueError(f"Attributor type {name!r} is already registered.")
    if config_cls().attributor_type != name:
        raise ValueError(f"{config_cls.__name__}().attributor_type must be {name!r}.")
    ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[name] = config_cls
    ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING[name] = attributor_cls
    attributor_cls.config_class = config_cls


def config_class(name: str) -> type["AttributorConfig"]:
    """Return the config class registered under ``name``.

    Raises:
        ValueError: No method is registered under ``name``.
    """
    if name not in ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"Unknown attributor_type {name!r}; registered: "
                         f"{sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING)}.")
    return ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[name]


def get_attributor_config(config: Union[str, Mapping[str, Any]], **overrides: Any
                          ) -> "AttributorConfig":
    """Build a config from a method name or a dict (with ``attributor_type``).

    Args:
        config: A registered name, or plain data as written by ``AttributorConfig.to_dict``.
        **overrides: Fields to set.

    Returns:
        The config.

    Raises:
        ConfigError: (a ``ValueError``) Unknown method or fields.
    """
    data = {"attributor_type": config} if isinstance(config, str) else dict(config)
    data.update(overrides)
    return config_class(data.get("attributor_type", "")).from_dict(data)


def get_attributor(model: Any, task: Any,
                   config: Union[str, Mapping[str, Any], "AttributorConfig"],
                   **kwargs: Any) -> "Attributor":
    """Build an attributor.

    Args:
        model: The model.
        task: The :class:`~hf_ggda.tasks.AttributionTask`.
        config: A config object, a config dict, or a method name (defaults).
        **kwargs: Extra constructor arguments of the method (e.g. in-memory checkpoints).

    Returns:
        The (unfitted) attributor.

    Raises:
        ConfigError: (a ``ValueError``) Unknown method.
    """
    if isinstance(config, (str, Mapping)):
        config = get_attributor_config(config)
    cls = ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING.get(config.attributor_type)
    if cls is None:
        raise ConfigError(f"Unknown attributor_type {config.attributor_type!r}; registered: "
                          f"{sorted(ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING)}.")
    return cls(model, task, config, **kwargs)
