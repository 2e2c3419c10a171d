"""The one exception type llmopt raises for bad input or a missing capability.

Its message is a single line that names the file or field at fault and what was expected, so the
command line and the workflow can print it as it is (``llmopt: error: <message>``).
"""


class LlmoptError(Exception):
    """Bad input (file, field, shape) or an absent capability, explained in one line."""
