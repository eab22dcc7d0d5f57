"""The one error type for mistakes a user fixes: a config, a file, the data, the environment, a model URI."""


class UserError(ValueError):
    """Bad input: the message is one line naming the key or file and the fix; the CLI exits 2 on it."""
