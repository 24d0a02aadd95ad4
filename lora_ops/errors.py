"""The one exception type users see."""


class LoraError(ValueError):
    """A problem with the user's input or request, explained in one line.

    The CLI prints it as ``error: <message>`` and exits with status 2; the Space shows it as a
    ``gr.Error``. Anything else that escapes is a bug in lora-resizer.
    """
