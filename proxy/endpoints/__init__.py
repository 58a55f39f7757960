"""The metered endpoints: plain ASGI applications, routed before Django (``config/routing.py``).

* ``asgi.py`` — raw ASGI plumbing: the body, the disconnect listener, sending bytes;
* ``validation.py`` — a body in, a ``Parsed`` request or a 400 out;
* ``request.py`` — one request's lifecycle: authenticate, admit, forward, settle, answer;
* ``relay.py`` — relaying and metering the upstream's answer (SSE included);
* ``refusals.py`` — what a refused or failed request answers;
* ``openai.py`` — the OpenAI-shaped endpoints built from those parts;
* ``translated.py`` — the base of the endpoints served natively or through chat completions:
  ``responses.py`` (the Responses API) and ``anthropic.py`` (Anthropic Messages, count_tokens).
"""

from .anthropic import CountTokensApplication, Messages
from .openai import ChatCompletions, Embeddings
from .request import MeteredApplication
from .responses import Responses

chat_completions = MeteredApplication(ChatCompletions())
embeddings = MeteredApplication(Embeddings())
responses = MeteredApplication(Responses())
messages = MeteredApplication(Messages())
count_tokens = CountTokensApplication()
