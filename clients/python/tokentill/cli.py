"""``tokentill``: sign in, look at the balance and usage, top up — from a terminal.

Exit codes: 0 done; 1 the server or the network failed; 2 bad usage; 3 not signed in (or the
sign-in was refused, denied or expired); 4 waited for a top-up that did not come.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

from .client import DeviceCode, Tokentill
from .errors import ApiError, KeyringUnavailable, LoginFailed, SignedOut, TopupTimeout

DEFAULT_SERVER = "http://127.0.0.1:8000"

OK, FAILED, USAGE, NOT_SIGNED_IN, TIMED_OUT = 0, 1, 2, 3, 4


@contextlib.contextmanager
def spinner(message: str, stream: TextIO | None = None) -> Iterator[None]:
    """A spinner while we wait on the browser, on a terminal only (never in a log or a pipe)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        print(message, file=stream)
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            stream.write(f"\r{frame} {message}")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")
        stream.flush()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _show_code(code: DeviceCode) -> None:
    print(f"Opening {code.verification_uri_complete} in your browser.", file=sys.stderr)
    print(
        f"If it does not open, visit {code.verification_uri} and enter the code: {code.user_code}",
        file=sys.stderr,
    )


def cmd_login(client: Tokentill, args: argparse.Namespace) -> int:
    if args.password:
        email = args.email or input("Email: ")
        password = getpass.getpass("Password: ")
        account = client.login_with_password(email, password)
    else:
        with spinner("Waiting for you to approve this sign-in in the browser…"):
            account = client.login_in_browser(args.name or "Tokentill CLI", on_code=_show_code)
    print(f"Signed in as {account.email}")
    return OK


def cmd_logout(client: Tokentill, args: argparse.Namespace) -> int:
    account = client.account
    client.logout()
    print(f"Signed out {account.email}" if account else "Not signed in")
    return OK


def cmd_whoami(client: Tokentill, args: argparse.Namespace) -> int:
    account = client.whoami()
    print(f"{account.email} (id {account.id}) on {client.base_url}")
    return OK


def cmd_balance(client: Tokentill, args: argparse.Namespace) -> int:
    wallet = client.balance()
    print(f"Balance:   ${wallet.balance:,.2f}")
    print(f"Held:      ${wallet.held:,.2f}")
    print(f"Available: ${wallet.available:,.2f}  ({wallet.status})")
    return OK


def cmd_topup(client: Tokentill, args: argparse.Namespace) -> int:
    print("Opening the top-up page in your browser…", file=sys.stderr)
    with spinner("Waiting for the payment to arrive…"):
        balance = client.topup(args.pack, timeout=args.timeout)
    print(f"Top-up received. Balance: ${balance:,.2f}")
    return OK


def cmd_usage(client: Tokentill, args: argparse.Namespace) -> int:
    if args.run:
        summary = client.run_summary(args.run)
        print(f"Run {summary.run}: {summary.steps} steps, ${summary.spend} spent, {summary.tool_charges} tool charges")
    records = client.usage(run=args.run, limit=args.limit)
    if not records:
        print("No usage yet.")
        return OK
    print(f"{'when':<20} {'model':<28} {'tokens':>13} {'charge':>13}  run")
    for record in records:
        tokens = f"{record['prompt_tokens']}+{record['completion_tokens']}"
        when = (record.get("created_at") or "")[:19].replace("T", " ")
        print(f"{when:<20} {record['model'][:28]:<28} {tokens:>13} {record['charge']:>13}  {record.get('run') or ''}")
    return OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tokentill", description="Your Tokentill account from a terminal.")
    top.add_argument(
        "--server",
        default=os.environ.get("TOKENTILL_URL") or DEFAULT_SERVER,
        help=f"the Tokentill server (default: $TOKENTILL_URL, else {DEFAULT_SERVER})",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = commands.add_parser("login", help="sign in (through the browser unless --password)")
    login.add_argument("--password", action="store_true", help="sign in with email and password instead")
    login.add_argument("--email", help="the email for --password (asked for when missing)")
    login.add_argument("--name", help="how this sign-in is listed in the portal's signed-in apps")
    login.set_defaults(handler=cmd_login)
    commands.add_parser("logout", help="sign out here and on the server").set_defaults(handler=cmd_logout)
    commands.add_parser("whoami", help="the signed-in account").set_defaults(handler=cmd_whoami)
    commands.add_parser("balance", help="the wallet's balance").set_defaults(handler=cmd_balance)
    topup = commands.add_parser("topup", help="buy credit in the browser and wait for it to arrive")
    topup.add_argument("pack", nargs="?", help="a pack's id (e.g. starter) to go straight to its checkout")
    topup.add_argument("--timeout", type=float, default=900, help="seconds to wait for the payment (default 900)")
    topup.set_defaults(handler=cmd_topup)
    usage = commands.add_parser("usage", help="the latest requests and what they cost")
    usage.add_argument("--run", help="only this run's requests, with its totals")
    usage.add_argument("--limit", type=int, default=20, help="how many records (default 20)")
    usage.set_defaults(handler=cmd_usage)
    return top


def main(argv: list[str] | None = None, **client_options: Any) -> int:
    args = parser().parse_args(argv)
    client = Tokentill(args.server, app_name="Tokentill CLI", **client_options)
    try:
        return args.handler(client, args)
    except SignedOut as exc:
        print(f"Not signed in: {exc}. Run `tokentill login`.", file=sys.stderr)
        return NOT_SIGNED_IN
    except LoginFailed as exc:
        print(f"Sign-in failed: {exc}", file=sys.stderr)
        return NOT_SIGNED_IN
    except TopupTimeout as exc:
        print(f"{exc}. If you paid, the balance will show it shortly: `tokentill balance`.", file=sys.stderr)
        return TIMED_OUT
    except KeyringUnavailable as exc:
        print(f"Cannot keep a sign-in here: {exc}", file=sys.stderr)
        return FAILED
    except ApiError as exc:
        print(f"The server refused: {exc.detail} (HTTP {exc.status_code})", file=sys.stderr)
        return FAILED
    except httpx.TransportError as exc:
        print(f"Cannot reach {args.server}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return FAILED
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
