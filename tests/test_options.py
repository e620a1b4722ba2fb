"""The command lines: every option explained with its default, the same spelling in every front end."""
import subprocess
import sys
from pathlib import Path

import pytest

from llaisys_chat import __version__, generate, repl
from llaisys_chat.frontends.kernel import install
from llaisys_chat.frontends.magic import CELL_PARSER, CONNECT_PARSER

BIN = Path(sys.executable).parent
PARSERS = {"llaisys-chat": repl.parser(), "llaisys-generate": generate.parser(), "%%llaisys": CELL_PARSER,
           "%llaisys connect": CONNECT_PARSER}


@pytest.mark.parametrize("name", PARSERS)
def test_every_option_is_explained_with_its_default(name):
    for action in PARSERS[name]._actions:
        if action.dest in ("help", "version"):
            continue
        assert action.help, f"{name} {action.option_strings} has no help"
        is_setting = action.nargs != 0 and action.dest not in ("prompt", "messages")  # not the input itself
        if is_setting:
            assert "(default: " in action.help, f"{name} {action.option_strings} does not show its default"


def test_front_ends_spell_shared_options_alike():
    sampling = {"--temperature", "--top-k", "--top-p", "--max-tokens", "--seed"}
    cluster = {"--model", "--profile", "--cluster-id", "-n"}

    def options(parser):
        return {s for action in parser._actions for s in action.option_strings}

    for name in ("llaisys-chat", "%%llaisys", "llaisys-generate"):
        assert sampling <= options(PARSERS[name]), name
    for name in ("llaisys-chat", "%llaisys connect"):
        assert cluster <= options(PARSERS[name]), name
    assert install.kernel_spec({"model": "m.gguf", "profile": None, "cluster_id": "c", "n": 3})["argv"][-6:] == \
        ["--model", "m.gguf", "--cluster-id", "c", "-n", "3"]


@pytest.mark.parametrize("program", ["llaisys-chat", "llaisys-generate"])
def test_version(program):
    result = subprocess.run([BIN / program, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"{program} {__version__}"
