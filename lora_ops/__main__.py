"""``python -m lora_ops``: see :mod:`lora_ops.cli`."""

import sys

from .cli import main

sys.exit(main())
