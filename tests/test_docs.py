"""The docs match the code: what they name exists.

Every repository file the docs (README.md, docs/*.md) and the package's docstrings name, every
``python -m torch_xla_lora[.bench] COMMAND --flag`` they give, every ``tests/...py::test_name`` they cite,
and every ``torch.ops.xla_lora`` op the package registers (named in docs/ops.md, or for the mesh regions'
ops in docs/distributed.md). Checked against the files, the command lines' own parsers (``--help``) and
torch's op registry, never against lists kept here; no XLA graph is built.
"""

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import torch

import torch_xla_lora  # noqa: F401  (registers torch.ops.xla_lora)
from torch_xla_lora import regions  # noqa: F401  (registers the mesh regions' ops)
from torch_xla_lora.bench.__main__ import COMMANDS
from torch_xla_lora.ops import _linear_fused  # noqa: F401  (registers the fused-producer ops)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "torch_xla_lora").rglob("*.py")) + sorted((ROOT / "csrc_pallas").glob("*.py"))
# Where a path is named relative to: the repository, the package, its kernels (``kernels/`` is csrc_pallas/
# installed as torch_xla_lora.kernels), the docs, the tests; a bare file name may live in any of its folders.
BASES = [ROOT, ROOT / "torch_xla_lora", ROOT / "docs", ROOT / "tests"]
FOLDERS = [ROOT, ROOT / "docs", ROOT / "tests", ROOT / "csrc_pallas", ROOT / "torch_xla_lora"]
FOLDERS += sorted(p for p in (ROOT / "torch_xla_lora").rglob("*") if p.is_dir())
# Files the docs name that are not in the repository: what commands write, and torch_xla's own source.
NOT_OURS = {"adapter_config.json", "adapter_model.safetensors", "e2e.json", "e2e.md"}
PATH = re.compile(r"`([\w./-]+\.(?:py|md|json|png|safetensors))(?:::\w+)?`|\]\(([\w./-]+\.(?:md|png|py))\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _exists(name: str, where: Path) -> bool:
    if name in NOT_OURS or name.startswith("torch_xla/"):
        return True
    name = name.removeprefix("./")
    if name.startswith("kernels/"):
        name = "csrc_pallas/" + name.removeprefix("kernels/")
    if "/" not in name:
        return any((folder / name).exists() for folder in FOLDERS)
    return any((base / name).exists() for base in (*BASES, where.parent))


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_named_exists(path):
    named = {a or b for a, b in PATH.findall(_text(path))}
    if path.suffix == ".py":  # the sources also name the files their commands write: only code and docs here
        named = {n for n in named if n.endswith((".py", ".md"))}
    assert not sorted(n for n in named if not _exists(n, path))


def _inline_code(text: str) -> list[str]:
    """The text of each inline code span (``...``, possibly across a line break) and each line of a fenced
    block, whitespace collapsed."""
    pieces = []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2:  # inside a fence
            pieces += part.splitlines()
        else:
            pieces += re.findall(r"`([^`]+)`", part)
    return [" ".join(p.split()) for p in pieces]


def _help(command: tuple[str, ...], mode: str | None) -> str:
    """What a command line prints for ``--help``: ``command`` ("bench", COMMAND) or (SUBCOMMAND,); with a
    ``mode`` (its first option: ``memory --decode-bytes`` hands the rest to a parser of its own) also what it
    prints after that option."""
    if command[0] == "bench":
        main, argv = importlib.import_module(COMMANDS[command[1]][0]).main, []
    else:
        main, argv = importlib.import_module("torch_xla_lora.__main__").main, [command[0]]
    out = io.StringIO()
    for args in ([*argv, "--help"], *([[*argv, mode, "--help"]] if mode else [])):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            main(args)
    return out.getvalue()


def _commands() -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(doc, its command, its options) of every command line the docs give: ``python -m torch_xla_lora.bench
    COMMAND ...`` as ("bench", COMMAND), ``python -m torch_xla_lora SUBCOMMAND ...`` as (SUBCOMMAND,)."""
    found = []
    for doc in DOCS:
        for code in _inline_code(_text(doc)):
            for match in re.finditer(r"python -m torch_xla_lora(\.bench)?((?: [^ |;&]+)*)", code):
                words = [w for w in match.group(2).split() if w != "--system-malloc"]
                if words and re.fullmatch(r"[a-z][\w-]*", words[0]):  # not the bare module, nor COMMAND
                    command = ("bench", words[0]) if match.group(1) else (words[0],)
                    found.append((doc.name, command, words[1:]))
    return found


def test_every_command_line_the_docs_give_exists():
    commands = _commands()
    assert len(commands) > 50  # the performance tables' commands are found
    helps, wrong = {}, []
    for doc, command, options in commands:
        if command[0] == "bench" and command[1] not in COMMANDS:
            wrong.append(f"{doc}: no bench command {command[1]!r}")
            continue
        key = (command, options[0] if options and options[0].startswith("--") else None)
        if key not in helps:
            helps[key] = _help(*key)
        for flag in (w.split("=")[0] for w in options if w.startswith("--")):
            if not re.search(re.escape(flag) + r"(?![\w-])", helps[key]):
                wrong.append(f"{doc}: {' '.join(command)} {' '.join(options)}: {flag} is not an option")
    assert not wrong


def test_every_test_cited_exists():
    tests = {p.name: set(re.findall(r"^def (test_\w+)", _text(p), re.M)) for p in (ROOT / "tests").glob("test_*.py")}
    cited = [
        (m.group(1), m.group(2)) for p in DOCS + SOURCES for m in re.finditer(r"tests/(test_\w+\.py)::(\w+)", _text(p))
    ]
    assert cited and not [c for c in cited if c[1] not in tests.get(c[0], ())]


def test_every_op_is_documented():
    ops = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("xla_lora::")}
    assert {"bgmv_shrink", "pooled_expand", "sharded_linear"} <= ops  # the registry is read
    reference, distributed = _text(ROOT / "docs" / "ops.md"), _text(ROOT / "docs" / "distributed.md")
    named = {op for op in ops if re.search(rf"\b{op}\b", reference) or re.search(rf"\b{op}\b", distributed)}
    assert ops == named
