"""The application named on the command line (``module:attr``) and the System it runs on.

``attr`` is either a ``happen.System`` configured in code (not started), or a function
``attr(system)`` (sync or async) that registers nodes on a System the command makes from its
settings.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import happen
from happen.cli._exit import ApplicationError, CommandError
from happen.cli._settings import Resolved, Source

__all__ = ["Application"]


class Application:
    """An application loaded from ``module:attr``; see :meth:`load`."""

    def __init__(
        self,
        target: str,
        *,
        system: happen.System | None = None,
        setup: Callable[[happen.System], Any] | None = None,
    ) -> None:
        self.target = target
        #: The System configured in code, when ``attr`` is one.
        self.system = system
        #: The function ``attr(system)``, when ``attr`` is one.
        self.setup = setup

    @classmethod
    def load(cls, target: str) -> Application:
        """Import ``module`` (the current directory first on ``sys.path``) and find ``attr``.

        Raises ``CommandError`` for a malformed target, an unknown module or attribute, or an
        attribute that is neither a System nor a function of one argument; ``ApplicationError``
        when importing the module raised (its traceback is the cause).
        """
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise CommandError(f"{target!r} is not module:attr (e.g. 'myapp:setup')")
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (module_name == missing or module_name.startswith(missing + ".")):
                raise CommandError(
                    f"no module named {missing!r} (looked in {cwd} and on sys.path)"
                ) from None
            raise ApplicationError(f"importing {module_name!r} failed: {exc}") from exc
        except Exception as exc:
            raise ApplicationError(f"importing {module_name!r} failed: {exc!r}") from exc
        found: Any = module
        for part in attr.split("."):
            try:
                found = getattr(found, part)
            except AttributeError:
                raise CommandError(f"module {module_name!r} has no attribute {attr!r}") from None
        if isinstance(found, happen.System):
            return cls(target, system=found)
        if callable(found):
            try:
                inspect.signature(found).bind(None)
            except TypeError:
                raise CommandError(
                    f"{target} must take one argument, the system: def {attr}(system): ..."
                ) from None
            except ValueError:
                pass  # no signature to check (some builtins): let the call tell
            return cls(target, setup=found)
        raise CommandError(
            f"{target} must be a happen.System or a function {attr}(system), not "
            f"{type(found).__name__}"
        )

    def check(
        self, transport: Resolved[str], namespace: Resolved[str], codec: Resolved[str]
    ) -> list[str]:
        """Check the settings against the application; return notices worth a warning.

        A System configured in code keeps the settings its code gave it: a command-line
        option that would change one raises ``CommandError``; an environment variable is not
        applied, and a notice says so. The transport and the namespace its code left out come
        from the command line, then the environment (``System.apply_defaults``); the codec is
        always the code's.
        """
        system = self.system
        if system is None:
            return []
        given = system.settings_given()
        notices: list[str] = []
        for setting, differs in (
            (transport, "transport" in given),
            (codec, True),
            (namespace, "namespace" in given and namespace.value != system.namespace),
        ):
            if setting.source is Source.COMMAND_LINE and differs:
                raise CommandError(
                    f"{setting.given} cannot change {self.target}: it is a System configured "
                    f"in code, with its own settings; pass a function "
                    f"{self.target.partition(':')[0]}:setup(system) to take them from the "
                    f"command line or the environment"
                )
            if setting.source is Source.ENVIRONMENT and differs:
                notices.append(
                    f"{setting.given} is not applied: {self.target} is a System configured in "
                    f"code, which keeps its own settings"
                )
        return notices

    def transport(self, transport: Resolved[str]) -> str | None:
        """The transport URL the application will use, or None when it is set in code."""
        system = self.system
        if system is not None and "transport" in system.settings_given():
            return None
        return transport.value

    async def make_system(
        self, transport: Resolved[str], namespace: Resolved[str], codec: Resolved[str]
    ) -> happen.System:
        """The System to serve: the one configured in code, or a new one from the settings
        with the setup function's nodes on it.

        Raises ``CommandError`` for settings the System refuses, ``ApplicationError`` when
        the setup function raises.
        """
        if self.system is not None:
            try:
                self.system.apply_defaults(
                    transport=None if transport.source is Source.DEFAULT else transport.value,
                    namespace=None if namespace.source is Source.DEFAULT else namespace.value,
                )
            except happen.HappenError as exc:
                raise CommandError(str(exc)) from None
            return self.system
        assert self.setup is not None
        try:
            system = happen.System(
                transport=transport.value, namespace=namespace.value, codec=codec.value
            )
        except happen.HappenError as exc:
            raise CommandError(str(exc)) from None
        try:
            result = self.setup(system)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise ApplicationError(f"{self.target}(system) raised {exc!r}") from exc
        return system
