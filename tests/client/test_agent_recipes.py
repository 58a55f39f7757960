"""The agent-framework recipes of the package's README, run for real against the live server and
the fake upstream: Strands Agents and the OpenAI Agents SDK, each billed per step (one usage
record per model call, labelled with the run) and stopped by the run's step limit."""

import json
from decimal import Decimal

import pytest
from tokentill import RunLimitReached

from proxy.models import UsageRecord
from tests.conftest import make_user
from tests.fake_upstream import DONE, MODEL, Reply, StreamReply, chunk, completion, sse, usage, usage_chunk

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = "How many words are in 'the quick brown fox'?"
ARGUMENTS = json.dumps({"text": "the quick brown fox"})


def causes(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__


def count_words(text: str) -> int:
    return len(text.split())


def tool_call_stream() -> StreamReply:
    """A streamed reply that calls ``word_count`` (OpenAI's chunk shape for tool calls)."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "word_count", "arguments": ""}}
    items = [
        sse(chunk(None, role="assistant", tool_calls=[call])),
        sse(chunk(None, tool_calls=[{"index": 0, "function": {"arguments": ARGUMENTS}}])),
        sse(chunk(None, finish="tool_calls")),
        usage_chunk(usage(40, 12, cost="0.00002")),
        DONE,
    ]
    # chunk() puts extra fields beside "choices"; tool calls belong in the delta.
    for index in (0, 1):
        event = json.loads(items[index][6:])
        event["choices"][0]["delta"]["tool_calls"] = event.pop("tool_calls")
        items[index] = sse(event)
    return StreamReply(items)


def answer_stream() -> StreamReply:
    return StreamReply(
        [
            sse(chunk("", role="assistant")),
            sse(chunk("Four words.")),
            sse(chunk(None, finish="stop")),
            usage_chunk(usage(60, 4, cost="0.00003")),
            DONE,
        ]
    )


def tool_call_completion() -> bytes:
    call = {"id": "call_1", "type": "function", "function": {"name": "word_count", "arguments": ARGUMENTS}}
    body = json.loads(completion("", u=usage(40, 12, cost="0.00002"), finish="tool_calls"))
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
    return json.dumps(body).encode()


# --- Strands Agents --------------------------------------------------------------------------


def strands_agent(client):
    """The README's Strands recipe."""
    from strands import Agent, ModelRetryStrategy, tool
    from strands.models.openai import OpenAIModel

    @tool
    def word_count(text: str) -> int:
        """Count the words in a text."""
        return count_words(text)

    class StopAtRunLimit(ModelRetryStrategy):
        # Strands retries every 429 as throttling (4 s, 8 s, …); a run limit will not lift.
        def is_retryable(self, exception: Exception) -> bool:
            return super().is_retryable(exception) and not isinstance(exception.__cause__, RunLimitReached)

    model = OpenAIModel(client=client.async_openai(), model_id=MODEL, params={"max_tokens": 300})
    return Agent(model=model, tools=[word_count], retry_strategy=StopAtRunLimit(), callback_handler=None)


def test_a_strands_agent_is_billed_per_step_under_one_run(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", tool_call_stream(), answer_stream())
    agent = strands_agent(client)
    with client.run(max_steps=5, agent="strands") as run:
        result = agent(QUESTION)
    assert "Four words." in str(result)
    records = list(UsageRecord.objects.order_by("id").values_list("run", "agent", "charge"))
    assert [(r, a) for r, a, _ in records] == [(run.id, "strands")] * 2
    assert run.steps == 2 and run.spend == Decimal(sum(c for *_, c in records)) / 10**9


def test_a_strands_agent_stops_at_the_runs_step_limit(client_for, fake_upstream, price):
    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", tool_call_stream(), answer_stream())
    agent = strands_agent(client)
    with pytest.raises(Exception) as stopped, client.run(max_steps=1, agent="strands") as run:
        agent(QUESTION)
    assert any(isinstance(error, RunLimitReached) for error in causes(stopped.value))  # Strands wraps it twice
    assert len(fake_upstream.calls("chat")) == 1  # the second step never reached the model
    assert run.steps == 1


# --- OpenAI Agents SDK -----------------------------------------------------------------------


def openai_agents_agent(client):
    """The README's OpenAI Agents SDK recipe (chat completions: see the README on the Responses API)."""
    from agents import Agent, OpenAIChatCompletionsModel, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # traces go to OpenAI's platform, not to Tokentill

    @function_tool
    def word_count(text: str) -> int:
        """Count the words in a text."""
        return count_words(text)

    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=client.async_openai())
    return Agent(name="counter", instructions="Answer briefly.", model=model, tools=[word_count])


def test_an_openai_agents_sdk_agent_is_billed_per_step_under_one_run(client_for, fake_upstream, price):
    from agents import Runner

    client = client_for(make_user("alice@example.com", balance="5.00"))
    answer = completion("Four words.", u=usage(60, 4, cost="0.00003"))
    fake_upstream.script("chat", Reply(body=tool_call_completion()), Reply(body=answer))
    agent = openai_agents_agent(client)
    with client.run(max_steps=5, agent="openai-agents") as run:
        result = Runner.run_sync(agent, QUESTION)
    assert result.final_output == "Four words."
    assert list(UsageRecord.objects.values_list("run", flat=True)) == [run.id] * 2
    tool_result = fake_upstream.calls("chat")[1].json["messages"][-1]
    assert tool_result["role"] == "tool" and tool_result["content"] == "4"
    assert run.steps == 2


def test_an_openai_agents_sdk_agent_stops_at_the_runs_step_limit(client_for, fake_upstream, price):
    from agents import Runner

    client = client_for(make_user("alice@example.com", balance="5.00"))
    fake_upstream.script("chat", Reply(body=tool_call_completion()), Reply(body=completion("Four words.")))
    agent = openai_agents_agent(client)
    with pytest.raises(RunLimitReached), client.run(max_steps=1, agent="openai-agents") as run:
        Runner.run_sync(agent, QUESTION)
    assert len(fake_upstream.calls("chat")) == 1
    assert run.steps == 1
