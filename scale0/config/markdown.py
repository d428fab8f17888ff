"""`python -m scale0.config --markdown`: the settings tables of docs/operating.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scale0.config.declared import COMMANDS
from scale0.config.kinds import BOOL, default_text, env_name, flag, specs


def markdown() -> str:
    """The settings tables of every command, for docs/operating.md."""
    lines = []
    for command, cls in COMMANDS.items():
        lines += [f"### `scale0 {command}`", "",
                  "| setting (TOML key) | flag | environment | default | meaning |",
                  "|---|---|---|---|---|"]
        for f, spec in specs(cls):
            arg = spec.metavar or (f"{{{','.join(spec.choices)}}}" if spec.choices else "")
            cli = arg if spec.positional else f"{flag(f.name)} {arg}".strip()
            if spec.kind is BOOL:
                cli = f"{flag(f.name)}, --no-{flag(f.name)[2:]}"
            meaning = spec.help.replace("|", "\\|") + (" (repeatable)" if spec.repeat else "")
            default = "required" if spec.required else default_text(f, spec)
            lines.append(f"| `{f.name}` | `{cli}` | `{env_name(f.name)}` | {default} | "
                         f"{meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale0.config")
    parser.add_argument("--markdown", action="store_true", help="print the settings tables")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


