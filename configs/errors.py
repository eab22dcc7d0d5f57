"""The one error type for mistakes a user fixes by changing a config, a file or the environment."""


class ConfigError(ValueError):
    """Bad input: the message is one line naming the key or file and the fix; the CLI exits 2 on it."""
