"""Prints command N (1-based) of the README's "Two commands" block, as written, comment removed.

CI runs each one from a fresh virtual environment, so the README's promise that they work from
a fresh clone (install step included) is tested literally.
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

section = README.read_text().split("## Two commands", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
assert block is not None, "README: no bash block under '## Two commands'"
commands = [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
print(commands[int(sys.argv[1]) - 1])
