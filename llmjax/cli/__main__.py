"""`python -m llmjax.cli ...` = `llmjax ...`."""

import sys

from llmjax.cli import main

sys.exit(main())
