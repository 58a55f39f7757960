"""The official openai SDK through the client: what each call cost (streams included), a 402 as
``InsufficientFunds``, and run / agent / tool labels that never leak between threads or tasks."""

import asyncio
import threading
from decimal import Decimal

import openai
import pytest
from tokentill import Charge, InsufficientFunds

from proxy.models import UsageRecord
from tests.conftest import make_user
from tests.fake_upstream import MODEL, Reply, StreamReply, completion, stream_of, usage
from wallet.models import Entry

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Say pong"}]


def test_a_completion_reports_its_charge_and_the_balance_left(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="10.00"))
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(412, 37, cost="0.0000597"))))
    seen: list[Charge] = []
    client.on_charge(seen.append)
    reply = client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content == "Pong."
    record = UsageRecord.objects.get()
    assert client.last_charge == Decimal("0.000071640") == Decimal(record.charge) / 10**9
    assert client.last_balance == Decimal("9.999928360")
    assert client.last_request_id == record.request_id
    assert seen == [Charge(record.request_id, client.last_charge, client.last_balance)]


def test_a_stream_reports_its_charge_from_the_line_the_sdk_skips(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="10.00"))
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", ".", u=usage(20, 3, cost="0.000012"))))
    stream = client.openai().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert client.last_charge is None  # not known until the stream has ended
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "Pong."
    record = UsageRecord.objects.get()
    assert (client.last_charge, client.last_balance) == (Decimal("0.000014400"), Decimal("9.999985600"))
    assert client.last_request_id == record.request_id


def test_the_async_client_streams_and_reports_too(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="10.00"))
    fake_upstream.script("chat", StreamReply(stream_of("Hi", u=usage(5, 1, cost="0.000001"))))
    fake_upstream.script("chat", Reply(body=completion("Again.", u=usage(5, 1, cost="0.000002"))))

    async def chat():
        llm = client.async_openai()
        stream = await llm.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return text, client.last_charge

    # Two event loops, one client: each loop gets its own connection pool.
    assert asyncio.run(chat()) == ("Hi", Decimal("0.000001200"))
    again = asyncio.run(client.async_openai().chat.completions.create(model=MODEL, messages=MESSAGES))
    assert again.choices[0].message.content == "Again." and client.last_charge == Decimal("0.000002400")


def test_a_402_is_insufficient_funds_with_what_it_needed(client_for, fake_upstream, price):
    client = client_for(make_user("bob@example.com"))
    with pytest.raises(InsufficientFunds) as refused:
        client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)
    error = refused.value
    assert isinstance(error, openai.APIStatusError) and error.status_code == 402
    assert error.balance == 0
    assert error.topup_url.endswith("/topup")
    assert not fake_upstream.requests


def test_a_402_in_a_stream_is_raised_before_any_chunk(client_for, fake_upstream, price):
    client = client_for(make_user("bob@example.com"))

    async def chat():
        return await client.async_openai().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)

    with pytest.raises(InsufficientFunds):
        asyncio.run(chat())


def test_calls_in_a_run_carry_its_id_agent_and_tool_labels(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="10.00"))
    fake_upstream.script("chat", *[Reply(body=completion("ok", u=usage(5, 1, cost="0.000001"))) for _ in range(3)])
    llm = client.openai()
    with client.run(agent="researcher") as run:
        llm.chat.completions.create(model=MODEL, messages=MESSAGES)
        with client.tool("web_search"):
            llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    llm.chat.completions.create(model=MODEL, messages=MESSAGES)  # outside: no labels
    labels = list(UsageRecord.objects.order_by("id").values_list("run", "agent", "tool"))
    assert labels == [(run.id, "researcher", ""), (run.id, "researcher", "web_search"), ("", "", "")]
    assert run.id.startswith("run_")


def test_runs_in_concurrent_threads_and_tasks_never_mix(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="10.00"))
    fake_upstream.script("chat", *[Reply(body=completion("ok", u=usage(5, 1)), delay=0.05) for _ in range(8)])
    barrier = threading.Barrier(4)

    def in_a_thread(name):
        with client.run(run_id=f"thread-{name}"):
            barrier.wait()
            client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)

    async def in_a_task(name):
        async with client.run(run_id=f"task-{name}"):
            await asyncio.sleep(0)
            await client.async_openai().chat.completions.create(model=MODEL, messages=MESSAGES)

    async def tasks():
        await asyncio.gather(*(in_a_task(n) for n in range(4)))

    threads = [threading.Thread(target=in_a_thread, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    asyncio.run(tasks())
    for thread in threads:
        thread.join(30)
    runs = sorted(UsageRecord.objects.values_list("run", flat=True))
    assert runs == sorted([f"thread-{n}" for n in range(4)] + [f"task-{n}" for n in range(4)])


def test_a_tool_charge_is_idempotent_and_reported(client_for, price):
    client = client_for(make_user("alice@example.com", balance="1.00"))
    first = client.charge("0.25", "web search", idempotency_key="search-1")
    again = client.charge("0.25", "web search", idempotency_key="search-1")
    assert (first.charged, first.balance) == (Decimal("0.25"), Decimal("0.75"))
    assert again == first
    assert client.last_charge == Decimal("0.25") and client.last_balance == Decimal("0.75")
    client.charge(Decimal("0.10"), "another search")  # a fresh key each time by default
    assert Entry.objects.filter(kind="charge").count() == 2
    with pytest.raises(TypeError, match="float"):
        client.charge(0.1, "money is never a float")


def test_a_tool_charge_the_wallet_cannot_cover_is_insufficient_funds(client_for, price):
    client = client_for(make_user("bob@example.com"))
    with pytest.raises(InsufficientFunds) as refused:
        client.charge("0.50", "web search")
    assert refused.value.needed == Decimal("0.50") and refused.value.topup_url.endswith("/topup")
    assert not Entry.objects.filter(kind="charge").exists()
