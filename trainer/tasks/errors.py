"""The error every task problem raises (declaration, data, inputs): its own module, so that the
task types and the declarations can both raise it without importing each other."""


class TaskError(ValueError):
    """A task declaration or its data is wrong. The message names task, split and column."""
