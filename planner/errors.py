"""Errors a user can cause. The CLI prints their message as one sentence and exits 2."""


class VramplanError(Exception):
    """Base class: the message is a complete, actionable sentence."""


class SourceError(VramplanError):
    """The model reference could not be turned into a config (path, Hub, bundle)."""


class ConfigError(VramplanError):
    """The config is malformed or describes an impossible model."""


class UnsupportedModelError(VramplanError):
    """The config is valid but its architecture is not modelled (yet), or needs remote code."""


class WorkloadError(VramplanError):
    """The workload or option values are out of range or inconsistent."""


class CatalogError(VramplanError):
    """A profile file (GPU catalog, precisions, runtime constants) is missing or invalid."""
