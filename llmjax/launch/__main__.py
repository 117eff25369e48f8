"""`python -m llmjax.launch ...` = `llmjax launch ...` (until the CLI wires it in)."""

import sys

from llmjax.launch import main

sys.exit(main(sys.argv[1:]))
