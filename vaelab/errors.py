"""Errors that stop a run with one message naming what is wrong and where."""


class VaelabError(Exception):
    """A problem with the user's input or run, reported as one clear message."""


class ConfigError(VaelabError):
    """A config value that cannot work, named by its key."""


class DataError(VaelabError):
    """Unusable data: names the file or generator, the key, and what was expected."""


class DivergenceError(VaelabError):
    """The training loss became NaN or infinite."""
