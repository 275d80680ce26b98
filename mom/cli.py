"""One command-line style for every tool of the package (mom.train, mom.data, mom.analysis, mom.generate, the
benchmarks, mom_kernels.aot): argparse's convention.

- Options are spelled with hyphens (`--max-steps`); the underscore spelling of the same option (`--max_steps`,
  the older style of some tools) is accepted as a hidden alias: it is rewritten before parsing, so it never
  shows in `--help` and never clashes with a prefix.
- Every option has a description in `--help` (tests/test_cli.py checks every tool's parser).
- A bad command line is one line on stderr that says it is the command line: `<prog>: error on the command
  line: <what>`, exit status 2 (`--help` shows the usage). Errors in a file a tool reads name that file instead.

argparse itself does the parsing; this only adds the alias rewrite and the error wording, so every tool builds
its parser as usual with `mom.cli.ArgumentParser(...)`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with underscore aliases and command-line errors that say so."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def hyphenate(self, args: Sequence[str]) -> List[str]:
        """`--name_with_underscores[=value]` -> `--name-with-underscores[=value]` where that is one of this
        parser's options; everything else (values, unknown options, anything after `--`) unchanged."""
        out = []
        for i, tok in enumerate(args):
            if tok == "--":
                return out + list(args[i:])
            if tok.startswith("--") and "_" in tok:
                name, eq, value = tok.partition("=")
                alias = "--" + name[2:].replace("_", "-")
                if alias in self._option_string_actions and name not in self._option_string_actions:
                    tok = alias + eq + value
            out.append(tok)
        return out

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.hyphenate(args), namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error on the command line: {' '.join(message.split())}\n")

