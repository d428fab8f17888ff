"""One declared settings source for `scale0 broker`, `scale0 wsgi` and `scale0 up`.

Theory of operation: each command's settings are one frozen dataclass whose
fields are made by `setting()`: a default, a help text and a `Kind` (how a
value is read from text and from TOML, and what it must be). Everything else
is generated from those fields, with the field name as the one name:

    field queue_size  ->  flag --queue-size, TOML key queue_size,
                          environment variable SCALE0_QUEUE_SIZE

`resolve()` merges defaults < file (`--config FILE`, TOML, top-level keys)
< environment < command line, and builds the dataclass. A repeatable setting
is a list in TOML, whitespace-separated in the environment, a repeated flag on
the command line; a source that sets it replaces the whole list of the lower
ones. Flags default to argparse.SUPPRESS so that only what the command line
really set is in the namespace; the help text carries the real default.

Every bad input is a `ConfigError` naming where it came from and the key
(`broker.toml: queue_size: expected an integer > 0, got 'abc'`), raised before
anything starts. Relative paths mean the same in every source: relative to the
working directory.

Adding a setting is one declaration in the dataclass; `cli.py` then reads it
from the resolved object. `python -m scale0.config --markdown` prints the
settings tables.

Declared once, also inside: the programs' internal settings objects (the
broker's `DispatchSettings`, `WorkerSettings`, `AsgiSettings`, the `Pool`,
`Relay` and `Broker` constructors) are made by `build()`, which matches each
setting to a field or parameter by its `to` name (`queue_timeout` ->
`queue_timeout_s`), never by a hand-written rename. Their defaults come from
here (`default(WsgiConfig, "threads")`), with one exception the layering
forces: core/ imports nothing outside wire/ and core/, so the settings that
`DispatchSettings` (core/dispatch.py) holds are declared here with its
defaults as theirs. tests/integration/test_settings_inside.py checks both: every name
an internal object takes is a setting or listed as its own, and every
internal default equals the declared one.

The package, by concern:

    kinds.py     Kind (reading and checking one value), Spec, setting(), specs()
    declared.py  the dataclasses: every command's settings
    load.py      command line, environment, TOML -> the dataclass; to_argv, build
    markdown.py  the settings tables of docs/operating.md
"""

from __future__ import annotations

# The public names, as they were when this was one module.
from scale0.config.declared import (
    COMMANDS,
    LOG_LEVELS,
    AsgiConfig,
    BrokerConfig,
    CommonConfig,
    CurveServerConfig,
    PeerConfig,
    PoolConfig,
    RelayConfig,
    UpConfig,
    WorkerCurveConfig,
    WsgiConfig,
    default_service,
)
from scale0.config.kinds import (
    BOOL,
    ENV_PREFIX,
    Invalid,
    Kind,
    LinkSpec,
    Spec,
    default,
    default_text,
    env_name,
    flag,
    help_note,
    setting,
    specs,
)
from scale0.config.load import (
    add_arguments,
    build,
    env_warnings,
    from_args,
    from_env,
    from_mapping,
    read_file,
    resolve,
    to_argv,
    unknown,
)
from scale0.config.markdown import main, markdown
from scale0.errors import ConfigError

__all__ = [
    "BOOL", "COMMANDS", "ENV_PREFIX", "LOG_LEVELS", "AsgiConfig", "BrokerConfig",
    "CommonConfig", "ConfigError", "CurveServerConfig", "Invalid", "Kind", "LinkSpec",
    "PeerConfig", "PoolConfig", "RelayConfig", "Spec", "UpConfig", "WorkerCurveConfig",
    "WsgiConfig", "add_arguments", "build", "default", "default_service", "default_text",
    "env_name", "env_warnings", "flag", "from_args", "from_env", "from_mapping", "help_note",
    "main", "markdown", "read_file", "resolve", "setting", "specs", "to_argv", "unknown",
]
