"""Runs: the server enforces each run's step and spend limits per request, tool charges count
against the spend, and the run's totals are read back after the block."""

import asyncio
from decimal import Decimal

import pytest
from tokentill import RunLimitReached, cli

from tests.conftest import make_user
from tests.fake_upstream import MODEL, Reply, completion, usage

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "next step"}]


def replies(n: int) -> list[Reply]:
    return [Reply(body=completion("ok", u=usage(10, 2, cost="0.00001"))) for _ in range(n)]


def test_the_step_after_max_steps_is_refused_before_it_reaches_the_model(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", *replies(3))
    llm = client.openai()
    with pytest.raises(RunLimitReached) as refused, client.run(max_steps=2) as run:
        for _ in range(3):
            llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert refused.value.code == "run_step_limit" and refused.value.status_code == 429
    assert len(fake_upstream.calls("chat")) == 2
    assert (run.steps, run.spend) == (2, Decimal("0.000024000"))


def test_tool_charges_count_against_the_runs_spend_but_not_its_steps(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", *replies(1))
    with client.run(max_spend="0.30", agent="shopper") as run:
        client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)
        with client.tool("price_lookup"):
            client.charge("0.25", "price lookup")
        with pytest.raises(RunLimitReached) as refused:
            client.charge("0.10", "one lookup too many")
    assert refused.value.code == "run_spend_limit"
    assert run.steps == 1 and run.summary.tool_charges == 1
    assert run.spend == Decimal("0.25") + Decimal("0.000012000")
    assert client.balance().balance == Decimal("5") - run.spend  # the refused charge took nothing


def test_an_async_run_reads_its_totals_back_too(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", *replies(2))

    async def agent():
        llm = client.async_openai()
        async with client.run(max_steps=5, run_id="nightly-report") as run:
            await asyncio.gather(*(llm.chat.completions.create(model=MODEL, messages=MESSAGES) for _ in range(2)))
        return run

    run = asyncio.run(agent())
    assert (run.id, run.steps, run.summary.requests) == ("nightly-report", 2, 2)


def test_a_run_with_no_calls_reads_back_as_empty(client_for):
    client = client_for(make_user("alice@example.com"))
    with client.run() as run:
        pass
    assert (run.steps, run.spend) == (0, 0)


def test_limits_are_checked_before_anything_is_sent(client_for):
    client = client_for(make_user("alice@example.com"))
    with pytest.raises(ValueError):
        client.run(max_steps=0)
    with pytest.raises(TypeError):
        client.run(max_spend=0.5)


def test_the_cli_shows_one_runs_usage(client_for, fake_upstream, price, capsys, memory_keyring, server):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", *replies(2))
    with client.run(run_id="support-42"):
        client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)
    client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert cli.main(["--server", server, "usage", "--run", "support-42"], keyring_backend=memory_keyring) == 0
    out = capsys.readouterr().out
    assert out.startswith("Run support-42: 1 steps, $0.000012000 spent, 0 tool charges\n")
    assert out.count(MODEL) == 1 and out.rstrip().endswith("support-42")
