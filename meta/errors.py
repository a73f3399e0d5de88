"""The project's error base, on the ground floor so every package can derive from it."""


class OblivionError(Exception):
    """Bad input or state, named in one line: every CLI prints it after ``error:`` and exits 2 (``meta.cli.fail``)
    instead of a traceback. Each package derives its own base from it (``StorageError``, ``ShardError``,
    ``ConfigError``, ``DataError``, ``KnownError``); an error that is not one of them is a bug and keeps its
    traceback."""
