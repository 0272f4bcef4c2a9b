"""What every medx command line does with a user error: one clear line, exit status 1.

The line is printed once, on stderr (`prog: message`); a log file that a command keeps (the
Hydra job's `<job>.log`) gets it as an ERROR record too, the terminal not twice.

A `MedxError` (possibly wrapped by Hydra's instantiate or a DataLoader worker) is a problem
with the user's input or environment: a traceback would hide the sentence that says what to
do. So is a third-party module that is not installed (medx has no optional extras: every
install has its dependencies, unless made with --no-deps). Anything else is a bug in medx and
keeps its traceback.

Also the console scripts (pyproject.toml `[project.scripts]`): `medx-<command> ARGS` is
`python -m medx.<command> ARGS`, each a function here. It runs the module's `main()` and drops
its result, which is for Python callers (tests, notebooks): a console script hands what it
returns to `sys.exit`, where anything but None or an int is an error. A command whose exit
status says more than "it ran" (medx.predict: all, some or none of the inputs predicted)
names its own entry point that returns that status (`command("medx.predict", "run")`). The
Hydra commands (train, eval) answer a plain `--help` with `hydra_help` before Hydra starts.
"""

from __future__ import annotations

import importlib
import logging
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from medx.errors import MedxError

HELP_FLAGS = {"--help", "-h"}

log = logging.getLogger("medx")


def user_error(err: BaseException | None) -> MedxError | None:
    """The MedxError behind `err` (Hydra wraps errors raised while instantiating)."""
    return next((e for e in _causes(err) if isinstance(e, MedxError)), None)


def missing_module(err: BaseException | None) -> str | None:
    """The third-party module behind `err` that is not installed (medx installed without its
    dependencies, or a plugin of one, e.g. boto3 for s3:// artifacts), else None."""
    for cause in _causes(err):
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            top = cause.name.split(".")[0]
            return None if top == "medx" else top  # a medx module missing is a bug
    return None


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


@contextmanager
def user_errors(prog: str = "medx") -> Iterator[None]:
    """Turn a user error raised in the body into `prog: <message>` on stderr and exit 1."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        if isinstance(err, SystemExit) and "medx.tracking.runs" not in sys.modules:
            raise  # argparse's --help, sys.exit: no run, so no signal handler of medx's, ran
        from medx.tracking.runs import stopped_by  # a signal: the shell's 128 + its number

        if (signum := stopped_by(err)) is None:
            raise
        sys.exit(128 + int(signum))
    except Exception as err:
        if (module := missing_module(err)) is not None:
            sys.exit(
                f"{prog}: the Python module '{module}' is not installed here: install medx with "
                "its dependencies (pip install medx, or make install in a checkout), or the "
                f"package that provides '{module}'."
            )
        if (medx_err := user_error(err)) is None:
            raise
        _log_to_files(f"{prog}: {medx_err}")
        sys.exit(f"{prog}: {medx_err}")


def _log_to_files(message: str) -> None:
    """`message` as an ERROR record for the handlers of the "medx" logger and its ancestors
    that do not write to the terminal (log files, pytest's capture): sys.exit prints it there."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if record.levelno >= handler.level and not _writes_to_terminal(handler):
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


def _writes_to_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    if isinstance(handler, logging.FileHandler) or stream is None:
        return False
    return stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def hydra_help(config_name: str, argv: Sequence[str] | None = None) -> bool:
    """Print the `--help` page of a Hydra command and return True, if `argv` asks for it.

    The page is Hydra's own (the config's `hydra.help` template: header, config groups, the
    config composed with the given overrides, footer). Hydra lists the groups by copying its
    config repository once per group and option, about 1 s of CPU for conf/; here they are
    conf/'s folders and files. Help with other flags (`--hydra-help`, `--resolve`, `-cd`), or
    a template that asks for Hydra's flags or groups, is left to Hydra.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    flags = [a for a in args if a.startswith("-")]
    if not flags or not set(flags) <= HELP_FLAGS:
        return False
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from medx.config import compose, config_dir

    try:
        cfg = compose([a for a in args if a not in HELP_FLAGS], config_name)
    except HydraException as err:  # a bad override: said as Hydra says it without --help
        sys.exit(str(err))
    template = cfg.hydra.help.template
    if "$FLAGS_HELP" in template or "$HYDRA_CONFIG_GROUPS" in template:
        return False
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    page = string.Template(template).substitute(
        APP_CONFIG_GROUPS=_config_groups(Path(config_dir())), CONFIG=OmegaConf.to_yaml(job)
    )
    print(page)
    return True


def _config_groups(root: Path) -> str:
    """`group: option, option` for every folder of YAML files under `root` but hydra/."""
    lines = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options and group.split("/")[0] != "hydra":
            lines.append(f"{group}: {', '.join(options)}\n")
    return "".join(lines)


def command(module: str, function: str = "main") -> Callable[[], None]:
    """The console script of `module` (e.g. "medx.predict"): its `main()`, exit status 0; or
    `function`, whose int result is the exit status."""

    def run() -> None:
        status = getattr(importlib.import_module(module), function)()
        if function != "main" and isinstance(status, int):
            sys.exit(status)

    run.__doc__ = f"`python -m {module}` as a console script."
    return run


def hydra_command(module: str, config_name: str) -> Callable[[], None]:
    """The console script of a Hydra command: `hydra_help`, else the module's `main()`."""

    def run() -> None:
        if not hydra_help(config_name):
            importlib.import_module(module).main()

    run.__doc__ = f"`python -m {module}` as a console script."
    return run


train = hydra_command("medx.train", "train")
eval = hydra_command("medx.eval", "eval")
predict = command("medx.predict", "run")
export = command("medx.export")
serve = command("medx.serve.__main__")
score = command("medx.score")
compare = command("medx.compare")
ui = command("medx.ui")
calibrate = command("medx.calibrate")
