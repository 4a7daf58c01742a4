"""Values of C expressions as this machine's compiler and Linux uapi headers see them.

Tests compare pyvhost's constants and struct sizes with the kernel's own headers this way, so a
number typed wrong fails here rather than on a real device.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def c_values(includes: Sequence[str], expressions: Mapping[str, str]) -> dict[str, int]:
    """``{name: value}`` of each C ``expressions[name]`` after ``#include``-ing ``includes``;
    an expression that is a bare macro the headers lack (newer than them) is left out. Skips
    the test when no compiler or header is installed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    missing = [h for h in includes if not (Path("/usr/include") / h).exists()]
    if cc is None or missing:
        pytest.skip("needs a C compiler and linux-libc-dev (apt-get install gcc linux-libc-dev)")
    lines = ["#include <stdio.h>", *(f"#include <{h}>" for h in includes), "int main(void) {"]
    for name, expr in expressions.items():
        line = f' printf("{name} %lu\\n", (unsigned long)({expr}));'
        lines.append(f"#ifdef {expr}\n{line}\n#endif" if expr.isidentifier() else line)
    lines.append(" return 0;\n}")
    with tempfile.TemporaryDirectory(prefix="pyvhost-c-") as folder:
        source, binary = Path(folder) / "values.c", Path(folder) / "values"
        source.write_text("\n".join(lines))
        subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
        out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}
