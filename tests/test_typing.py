"""The public types, checked with ``mypy --strict`` in a subprocess (DESIGN section 13).

- ``tests/typing/*.py`` use the API as an application would and must pass;
- every Python program of the README and every program in ``examples/`` must pass;
- each snippet of ``BAD`` misuses the API, and mypy must report it on the line marked
  ``# error``, with the message given.

mypy runs once over all of them (the first run takes a while: it checks happen and its
dependencies), and each test reads its part of the report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = sorted((ROOT / "tests" / "typing").glob("*.py"))
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
README_BLOCKS = [
    block
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    if "anyio.run(main)" in block
]

HEADER = """\
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

import happen


class Invoice(msgspec.Struct):
    order: int
    total: int


async def case(node: happen.Node) -> None:
"""

#: name -> (the body of ``case``, a fragment of the error mypy must report on its line).
#: (For ``node.on`` mypy says "No overload variant of "on" of "Node"", or names the
#: argument of the one overload that takes a handler.)
BAD: dict[str, tuple[str, str]] = {
    "handler_of_one_argument": (
        """
        @node.on("x")  # error
        async def handler(event: happen.Event) -> None: ...
        """,
        'Value of type variable "H" of function cannot be',
    ),
    "handler_of_one_argument_called": (
        """
        async def handler(event: happen.Event) -> None: ...
        node.on("x", handler)  # error
        """,
        '"on" of "Node"',
    ),
    "handler_without_arguments": (
        """
        node.on("x", lambda: None)  # error
        """,
        '"on" of "Node"',
    ),
    "handler_not_callable": (
        """
        node.on("x", 42)  # error
        """,
        '"on" of "Node"',
    ),
    "handler_event_not_an_event": (
        """
        @node.on("x")  # error
        async def handler(event: str, context: dict[str, Any]) -> None: ...
        """,
        'Value of type variable "H" of function cannot be',
    ),
    "handler_context_not_a_dict": (
        """
        async def handler(event: happen.Event, context: list[int]) -> None: ...
        node.on("x", handler)  # error
        """,
        '"on" of "Node"',
    ),
    "handler_requiring_a_third_argument": (
        """
        async def handler(event: happen.Event, context: dict[str, Any], extra: int) -> None: ...
        node.on("x", handler)  # error
        """,
        '"on" of "Node"',
    ),
    "unknown_executor": (
        """
        def handler(event: happen.Event, context: dict[str, Any]) -> None: ...
        node.on("x", handler, executor="thread")  # error
        """,
        '"on" of "Node"',
    ),
    "pattern_not_a_pattern": (
        """
        node.on(42, lambda event, context: None)  # error
        """,
        '"on" of "Node"',
    ),
    "typed_payload_misused": (
        """
        @node.on("x")
        async def handler(event: happen.Event[Invoice], context: dict[str, Any]) -> str:
            return event.payload.customer  # error
        """,
        '"Invoice" has no attribute "customer"',
    ),
    "result_type_misused": (
        """
        invoice = await node.send("billing", {"type": "x"}, result_type=Invoice)
        name: str = invoice.total  # error
        """,
        'Incompatible types in assignment (expression has type "int", variable has type "str")',
    ),
    "result_assigned_to_another_type": (
        """
        count: int = await node.send("billing", {"type": "x"}, result_type=Invoice)  # error
        """,
        "Incompatible types in assignment",
    ),
    "item_type_misused": (
        """
        async for invoice in node.stream("billing", {"type": "x"}, item_type=Invoice):
            invoice.customer  # error
        """,
        '"Invoice" has no attribute "customer"',
    ),
    "event_not_an_event": (
        """
        await node.send("billing", ["x"])  # error
        """,
        'No overload variant of "send"',
    ),
}


def _readme_file(index: int) -> str:
    return f"readme_block{index}.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    """mypy --strict over every file above: the errors, by file name."""
    work = tmp_path_factory.mktemp("typing")
    checked: list[Path] = [*GOOD, *EXAMPLES]
    for index, block in enumerate(README_BLOCKS):
        path = work / _readme_file(index)
        path.write_text(block)
        checked.append(path)
    for name, (body, _) in BAD.items():
        path = work / f"bad_{name}.py"
        path.write_text(HEADER + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n")
        checked.append(path)
    names = [path.name for path in checked]
    assert len(set(names)) == len(names), f"mypy needs distinct module names: {names}"
    (work / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(work / "mypy.ini"),
            "--cache-dir",
            str(work / "cache"),
            "--no-error-summary",
            "--show-error-codes",
            *map(str, checked),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), f"mypy failed to run:\n{done.stdout}{done.stderr}"
    errors: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for line in done.stdout.splitlines():
        found = re.match(r"(.+?):(\d+): error: (.*)", line)
        if found:
            errors[Path(found.group(1)).name].append((int(found.group(2)), found.group(3)))
    return errors


def _show(errors: list[tuple[int, str]]) -> str:
    return "\n".join(f"  line {line}: {message}" for line, message in errors)


@pytest.mark.parametrize("path", GOOD, ids=[path.stem for path in GOOD])
def test_typed_usage_passes_mypy_strict(
    report: dict[str, list[tuple[int, str]]], path: Path
) -> None:
    assert not report[path.name], f"{path.name}:\n{_show(report[path.name])}"


@pytest.mark.parametrize("index", range(len(README_BLOCKS)), ids=_readme_file)
def test_readme_programs_pass_mypy_strict(
    report: dict[str, list[tuple[int, str]]], index: int
) -> None:
    name = _readme_file(index)
    assert not report[name], f"README program {index}:\n{_show(report[name])}"


@pytest.mark.parametrize(
    "path", EXAMPLES, ids=[str(path.relative_to(ROOT / "examples")) for path in EXAMPLES]
)
def test_examples_pass_mypy_strict(report: dict[str, list[tuple[int, str]]], path: Path) -> None:
    assert not report[path.name], f"{path}:\n{_show(report[path.name])}"


@pytest.mark.parametrize("name", list(BAD))
def test_misuse_is_reported(report: dict[str, list[tuple[int, str]]], name: str) -> None:
    body, expected = BAD[name]
    source = HEADER + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
    marked = [n for n, line in enumerate(source.splitlines(), 1) if line.endswith("# error")]
    assert len(marked) == 1, "mark one line of the snippet with '# error'"
    errors = report[f"bad_{name}.py"]
    assert any(line == marked[0] and expected in message for line, message in errors), (
        f"expected on line {marked[0]}: {expected}\nmypy said:\n{_show(errors)}"
    )
