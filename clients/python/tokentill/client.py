"""``Tokentill``: one server, one signed-in account, everything an app needs around its model calls."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
import webbrowser
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import httpx

from . import _runs, events
from ._http import AsyncOpenAI, Charge, Meter, OpenAI, PerLoopTransport
from ._session import BearerAuth, Session, _detail
from ._store import Tokens, TokenStore
from .errors import ApiError, InsufficientFunds, LoginFailed, RunLimitReached, TopupTimeout, usd

T = TypeVar("T")

# The openai SDK insists on an api_key; BearerAuth replaces the header it makes on every request.
_SESSION_PLACEHOLDER = "tokentill-session"


@dataclass(frozen=True)
class Account:
    email: str
    id: int | None = None


@dataclass(frozen=True)
class Balance:
    """``GET /api/wallet`` (USD). ``status``: ``ok``, ``low`` or ``blocked``."""

    balance: Decimal
    held: Decimal
    available: Decimal
    status: str
    currency: str = "USD"


@dataclass(frozen=True)
class DeviceCode:
    """What the user needs to approve a browser sign-in (RFC 8628)."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int
    device_code: str


@dataclass(frozen=True)
class ChargeResult:
    charged: Decimal
    balance: Decimal
    entry_id: int


def print_device_code(code: DeviceCode) -> None:
    """The default way to show the code: on stderr, for whoever runs the app from a terminal."""
    print(
        f"To sign in, approve this app in your browser.\n"
        f"If it did not open, visit {code.verification_uri} and enter the code {code.user_code}",
        file=sys.stderr,
    )


def _run_sync(coro: Coroutine[Any, Any, T], name: str) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(f"{name}() blocks; inside async code use `await client.a{name}(...)`")


class Tokentill:
    """A client for one Tokentill server.

    Sign in once (``login_in_browser()`` or ``login_with_password()``); the tokens go to the OS
    keyring and later runs of the app find them there. ``openai()`` and ``async_openai()`` are the
    official SDK clients, pointed at the server's ``/v1`` and kept signed in.
    """

    def __init__(
        self,
        base_url: str,
        *,
        keyring_backend: Any = None,
        service_name: str = "tokentill",
        app_name: str = "Tokentill Python client",
        timeout: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.app_name = app_name
        scheme, _, rest = self.base_url.partition("://")
        self.events_url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws/events"
        headers = {"User-Agent": events.USER_AGENT}
        self._public = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        store = TokenStore(self.base_url, service_name=service_name, backend=keyring_backend)
        self._session = Session(store, self._public)
        self._auth = BearerAuth(self._session)
        self._meter = Meter()
        self._hooks = {"request": [_runs.label_request], "response": [self._meter.on_response]}
        self._ahooks = {"request": [_runs.alabel_request], "response": [self._meter.aon_response]}
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers, auth=self._auth, event_hooks=self._hooks
        )
        self._ahttp = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers=headers,
            auth=self._auth,
            event_hooks=self._ahooks,
            transport=PerLoopTransport(),
        )
        self._openai: OpenAI | None = None
        self._async_openai: AsyncOpenAI | None = None
        self._openai_lock = threading.Lock()

    # --- signing in and out --------------------------------------------------------------------

    @property
    def account(self) -> Account | None:
        """Who this app is signed in as on this server (from the keyring), or None."""
        tokens = self._session.tokens()
        return Account(tokens.email, tokens.id) if tokens else None

    def login_with_password(self, email: str, password: str) -> Account:
        self._session.tokens()  # no keyring to keep the sign-in in: say so before signing in
        response = self._public.post(
            "/api/auth/token", json={"email": email, "password": password, "client_name": self.app_name}
        )
        if response.status_code == 401:
            raise LoginFailed(_detail(response), reason="invalid_credentials")
        if response.status_code == 429:
            raise LoginFailed(_detail(response), reason="throttled")
        if response.status_code != 200:
            raise ApiError(response.status_code, _detail(response))
        return self._signed_in(response.json(), email=email.strip().lower())

    def login_in_browser(
        self,
        client_name: str | None = None,
        *,
        open_browser: Callable[[str], Any] = webbrowser.open,
        on_code: Callable[[DeviceCode], Any] = print_device_code,
        cancel: threading.Event | None = None,
    ) -> Account:
        """Sign in through the browser (the device authorization flow): opens the server's
        ``/device`` page with the code filled in, shows the code (``on_code``; stderr by
        default), then polls until the user approves or denies there, or the code expires.
        ``cancel``, when set from another thread, stops the wait (``LoginFailed("cancelled")``)."""
        self._session.tokens()  # no keyring to keep the sign-in in: say so before signing in
        response = self._public.post("/api/auth/device", json={"client_name": client_name or self.app_name})
        if response.status_code != 200:
            raise ApiError(response.status_code, _detail(response))
        data = response.json()
        code = DeviceCode(**{name: data[name] for name in DeviceCode.__dataclass_fields__})
        on_code(code)
        try:
            open_browser(code.verification_uri_complete)
        except Exception:  # noqa: S110 - no browser here: the code shown above is the way in
            pass
        interval = float(code.interval)
        deadline = time.monotonic() + code.expires_in
        cancel = cancel or threading.Event()
        while time.monotonic() < deadline:
            if cancel.wait(interval):
                raise LoginFailed("sign-in cancelled", reason="cancelled")
            response = self._public.post("/api/auth/device/token", json={"device_code": code.device_code})
            if response.status_code == 200:
                return self._signed_in(response.json())
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            error = body.get("error") if isinstance(body, dict) else None
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                # RFC 8628 §3.5: the server says how long to wait from now on (else 5 s more).
                interval = float(body.get("interval") or interval + 5)
                continue
            if error in ("access_denied", "expired_token", "invalid_grant"):
                raise LoginFailed(_detail(response), reason=error)
            raise ApiError(response.status_code, _detail(response))
        raise LoginFailed("the sign-in code expired before it was approved", reason="expired_token")

    def _signed_in(self, pair: dict, *, email: str | None = None) -> Account:
        account_id = None
        if email is None:
            me = self._public.get("/api/auth/me", headers={"Authorization": f"Bearer {pair['access']}"})
            if me.status_code != 200:
                raise ApiError(me.status_code, _detail(me))
            email, account_id = me.json()["email"], me.json()["id"]
        self._session.adopt(Tokens.issued(pair, email=email, id=account_id))
        return Account(email, account_id)

    def logout(self) -> None:
        """End this sign-in on the server (its refresh and access tokens stop working) and
        forget it here. The keyring entry goes even when the server cannot be reached."""
        tokens = self._session.forget()
        if tokens is None:
            return
        response = self._public.post("/api/auth/logout", json={"refresh": tokens.refresh})
        if response.status_code not in (204, 401):  # 401: already revoked, nothing left to end
            raise ApiError(response.status_code, _detail(response))

    def whoami(self) -> Account:
        """The account the server sees behind this sign-in (``GET /api/auth/me``)."""
        data = self._get("/api/auth/me")
        return Account(data["email"], data["id"])

    # --- the official openai clients -----------------------------------------------------------

    def openai(self, **kwargs: Any) -> OpenAI:
        """An ``openai.OpenAI`` for this server's ``/v1``, signed in as this client, made once and
        shared (it is thread-safe). ``kwargs`` go to the SDK the first time (``max_retries``…)."""
        with self._openai_lock:
            if self._openai is None:
                http_client = httpx.Client(auth=self._auth, event_hooks=self._hooks)
                self._openai = OpenAI(
                    base_url=self.base_url + "/v1", api_key=_SESSION_PLACEHOLDER, http_client=http_client, **kwargs
                )
            return self._openai

    def async_openai(self, **kwargs: Any) -> AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` likewise, made once; it works from any event loop (each loop
        gets its own connection pool), so frameworks that start a loop per call can share it."""
        with self._openai_lock:
            if self._async_openai is None:
                http_client = httpx.AsyncClient(auth=self._auth, event_hooks=self._ahooks, transport=PerLoopTransport())
                self._async_openai = AsyncOpenAI(
                    base_url=self.base_url + "/v1", api_key=_SESSION_PLACEHOLDER, http_client=http_client, **kwargs
                )
            return self._async_openai

    @property
    def last_charge(self) -> Decimal | None:
        """What the last call made through this client cost (USD), streamed calls included once
        their stream has been read to the end."""
        return self._meter.last.charge if self._meter.last else None

    @property
    def last_balance(self) -> Decimal | None:
        return self._meter.last.balance if self._meter.last else None

    @property
    def last_request_id(self) -> str | None:
        return self._meter.last.request_id if self._meter.last else None

    def on_charge(self, listener: Callable[[Charge], Any]) -> None:
        """Call ``listener(charge)`` after every charged response (in the thread that read it)."""
        self._meter.subscribe(listener)

    # --- money ---------------------------------------------------------------------------------

    def balance(self) -> Balance:
        return _balance(self._get("/api/wallet"))

    async def abalance(self) -> Balance:
        return _balance(await self._aget("/api/wallet"))

    def packs(self) -> list[dict]:
        """The credit packs on sale (``GET /api/packs``): id (slug), name, price, credit…"""
        return self._get("/api/packs")

    def watch_balance(self, **options: Any) -> AsyncIterator[events.BalanceEvent]:
        """Balance events as they happen, for as long as you iterate: a ``snapshot`` first, and
        again after every reconnect (with exponential backoff and jitter), so nothing that
        changed while the socket was down goes unseen. Options: ``initial_backoff``,
        ``max_backoff``, ``open_timeout`` (seconds). Ends only with ``SignedOut``."""
        return events.watch(self._session, self.events_url, **options)

    def topup(
        self, pack: str | None = None, *, timeout: float = 600, open_browser: Callable[[str], Any] = webbrowser.open
    ) -> Decimal:
        """Open the portal's top-up page in the browser, already signed in (a one-time link),
        and wait until the money arrives; returns the new balance (USD). ``pack``: a pack's id to
        go straight to its checkout. Raises ``TopupTimeout`` after ``timeout`` seconds."""
        return _run_sync(self.atopup(pack, timeout=timeout, open_browser=open_browser), "topup")

    async def atopup(
        self, pack: str | None = None, *, timeout: float = 600, open_browser: Callable[[str], Any] = webbrowser.open
    ) -> Decimal:
        watcher = self.watch_balance()
        try:
            async with asyncio.timeout(timeout):
                # Listening before the browser opens: a payment that lands at once is not missed.
                before = (await anext(watcher)).balance
                link = await self._apost("/api/auth/web-link", {"next": f"/topup/{pack}" if pack else "/topup"})
                await asyncio.to_thread(open_browser, link["url"])
                async for event in watcher:
                    if event.reason == "top_up" or event.balance > before:
                        return event.balance
        except TimeoutError:
            raise TopupTimeout(f"no top-up arrived within {timeout:g} s") from None
        finally:
            await watcher.aclose()
        raise TopupTimeout("the balance stream ended")  # unreachable: watch() only ends by raising

    def retry_after_topup(self, fn: Callable[..., T], *args: Any, pack: str | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``; if it is refused for lack of funds, top up (``topup()``) and
        call it once more. Opt-in: the user is sent to a checkout page only where you ask for it."""
        try:
            return fn(*args, **kwargs)
        except InsufficientFunds:
            self.topup(pack)
        return fn(*args, **kwargs)

    async def aretry_after_topup(
        self, fn: Callable[..., Awaitable[T]], *args: Any, pack: str | None = None, **kwargs: Any
    ) -> T:
        try:
            return await fn(*args, **kwargs)
        except InsufficientFunds:
            await self.atopup(pack)
        return await fn(*args, **kwargs)

    def charge(
        self,
        amount: Decimal | str | int,
        description: str,
        *,
        idempotency_key: str | None = None,
        metadata: dict | None = None,
    ) -> ChargeResult:
        """Charge a tool use now (``POST /v1/user/charge``). Inside ``run()`` it counts against the
        run's spend limit. The idempotency key defaults to a fresh one; pass your own to make a
        retried charge count once."""
        value = _runs.money(amount, "amount")
        body: dict[str, Any] = {"amount": f"{value:f}", "description": description}
        if metadata is not None:
            body["metadata"] = metadata
        headers = {"Idempotency-Key": idempotency_key or f"tokentill-{uuid.uuid4()}"}
        response = self._http.post("/v1/user/charge", json=body, headers=headers)
        data = _json(response)
        if response.status_code == 200:
            result = ChargeResult(usd(data["charged"]), usd(data["balance"]), data["entry_id"])
            self._meter.record(Charge(response.headers.get("x-request-id"), result.charged, result.balance))
            return result
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        message = str(data.get("message") or error.get("message") or response.reason_phrase)
        if response.status_code == 402:
            raise InsufficientFunds(message, response=response, body={**data, "needed": body["amount"]})
        if response.status_code == 429 and error.get("code") in ("run_step_limit", "run_spend_limit"):
            raise RunLimitReached(message, response=response, body=error)
        raise ApiError(response.status_code, message)

    # --- runs ----------------------------------------------------------------------------------

    def run(
        self,
        max_steps: int | None = None,
        max_spend: Decimal | str | int | None = None,
        agent: str | None = None,
        run_id: str | None = None,
    ) -> _runs.Run:
        """A context (``with`` or ``async with``) in which every call through this client's
        openai clients and ``charge()`` belongs to one run; the server refuses the step that would
        go past ``max_steps`` model calls or ``max_spend`` USD (``RunLimitReached``). Afterwards
        ``run.steps`` and ``run.spend`` say what it used."""
        run = _runs.Run(self, agent=agent, max_steps=max_steps, max_spend=max_spend)
        if run_id:
            run.id = run_id
        return run

    def tool(self, name: str) -> _runs.Tool:
        """A context whose calls are labelled as made for the tool ``name``."""
        return _runs.Tool(name)

    def run_summary(self, run_id: str) -> _runs.RunSummary:
        try:
            return _runs.RunSummary.from_json(self._get(f"/api/runs/{run_id}"))
        except ApiError as error:
            if error.status_code == 404:  # nothing was billed in it
                return _runs.RunSummary(run_id, 0, Decimal(0), 0, 0)
            raise

    async def arun_summary(self, run_id: str) -> _runs.RunSummary:
        try:
            return _runs.RunSummary.from_json(await self._aget(f"/api/runs/{run_id}"))
        except ApiError as error:
            if error.status_code == 404:
                return _runs.RunSummary(run_id, 0, Decimal(0), 0, 0)
            raise

    def usage(self, *, run: str | None = None, limit: int = 50) -> list[dict]:
        """The latest usage records (``GET /api/usage``), newest first; ``run`` filters by run."""
        params: dict[str, Any] = {"limit": limit}
        if run:
            params["run"] = run
        return self._get("/api/usage", params=params)["results"]

    # --- plumbing ------------------------------------------------------------------------------

    def _get(self, path: str, **kwargs: Any) -> Any:
        return _ok(self._http.get(path, **kwargs))

    async def _aget(self, path: str, **kwargs: Any) -> Any:
        return _ok(await self._ahttp.get(path, **kwargs))

    async def _apost(self, path: str, body: dict) -> Any:
        return _ok(await self._ahttp.post(path, json=body))

    def close(self) -> None:
        self._http.close()
        self._public.close()
        if self._openai is not None:
            self._openai.close()

    def __enter__(self) -> Tokentill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"results": data}


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise ApiError(response.status_code, _detail(response))
    return response.json()


def _balance(data: dict) -> Balance:
    return Balance(
        balance=usd(data["balance"]),
        held=usd(data["held"]),
        available=usd(data["available"]),
        status=data.get("status", ""),
        currency=data.get("currency", "USD"),
    )
