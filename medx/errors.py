"""User-facing errors: each message names the file or config key and says what to do."""


class MedxError(Exception):
    """An error caused by the user's input or environment, not by a bug in medx."""


class ConfigError(MedxError, ValueError):
    """A config value is missing, unknown or inconsistent."""


class DataError(MedxError):
    """A data set, image or mask cannot be used as it is."""


class CheckpointError(MedxError):
    """A checkpoint file cannot be used: missing, damaged, not medx's, or not plain weights."""
