"""Slash commands (frontends/commands.py) on a session of the fake cluster: no MPI, no model."""
import json

import pytest
from fake_cluster import fake_cluster

from llaisys_chat.errors import LlaisysError
from llaisys_chat.frontends.commands import Commands


@pytest.fixture
def commands(tmp_path):
    client, _ = fake_cluster(tmp_path, reply_for=lambda prompt: "Sure thing.")
    yield Commands(client.session(system="Be brief."), client)
    client.close()


def test_set_changes_the_session_and_show_reports_it(commands):
    assert commands.run("/set temperature 0.25").text == "temperature = 0.25"
    assert commands.run("/set max_tokens 9").text == "max_tokens = 9"
    assert commands.run("/set seed none").text == "seed: random"
    assert commands.session.sampling["temperature"] == 0.25 and commands.session.sampling["max_new_tokens"] == 9
    shown = commands.run("/show").text
    assert "temperature=0.25" in shown and "max_tokens=9" in shown and "seed=random" in shown
    assert "Ranks: 1 on here" in shown and "System prompt: Be brief." in shown


def test_conversation_commands(commands, tmp_path):
    session = commands.session
    session.send("Hello.")
    assert commands.run("/history").text == "system: Be brief.\n\nuser: Hello.\n\nassistant: Sure thing."
    assert commands.run("/retry").regenerate
    assert commands.run("/stats").text.startswith("2 tokens (stop); prompt")
    assert commands.run(f"/save {tmp_path / 'c.json'}").text == f"Saved to {tmp_path / 'c.json'}"
    assert json.loads((tmp_path / "c.json").read_text())["messages"][0]["content"] == "Hello."
    assert commands.run("/undo").text == "Removed: Hello."
    assert commands.run("/reset").text == "New conversation." and session.messages == []
    assert commands.run(f"/load {tmp_path / 'c.json'}").text == f"Loaded 2 messages from {tmp_path / 'c.json'}"
    assert commands.run("/system Talk like a pirate.").text == "System prompt set."
    assert session.system == "Talk like a pirate."
    assert commands.run("/quit").quit and commands.run("/BYE").quit


@pytest.mark.parametrize("line,hint", [
    ("/stats", "no reply yet"),
    ("/set top_p 2", "top_p must be in (0, 1]"),
    ("/set max_tokens 0", "max_new_tokens must be a positive whole number"),
    ("/set temperature", "usage: /set PARAM VALUE"),
    ("/save", "usage: /save FILE"),
    ("/", "unknown command /"),
])
def test_mistakes_are_one_line_errors(commands, line, hint):
    with pytest.raises(LlaisysError) as error:
        commands.run(line)
    assert hint in str(error.value) and "\n" not in str(error.value)
