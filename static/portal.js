// Tokentill portal: live balance over /ws/events (session cookie auth) and the copy button.
// Amounts arrive as 9-place decimal strings and are formatted with BigInt, never floats.
"use strict";

(function () {
  function toNanos(decimal) {
    const negative = decimal.startsWith("-");
    const [whole, fraction = ""] = decimal.replace("-", "").split(".");
    const nanos = BigInt(whole + fraction.padEnd(9, "0").slice(0, 9));
    return negative ? -nanos : nanos;
  }

  // core.money.format_money, the one display rule: half-up to at most six decimals, trailing
  // zeros trimmed down to cents; an amount too small for six decimals is shown to the nanodollar.
  function formatMoney(decimal) {
    const nanos = toNanos(decimal);
    const negative = nanos < 0n;
    const abs = negative ? -nanos : nanos;
    let shown = ((abs + 500n) / 1000n) * 1000n; // half-up to the micro-dollar, in nanodollars
    if (shown === 0n) shown = abs;
    const dollars = (shown / 1000000000n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    let fraction = (shown % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "");
    fraction = fraction.padEnd(2, "0");
    return (negative && shown > 0n ? "-" : "") + "$" + dollars + "." + fraction;
  }

  function applyBalance(event) {
    for (const field of ["balance", "held", "available"]) {
      if (typeof event[field] !== "string") continue;
      for (const node of document.querySelectorAll('[data-field="' + field + '"]')) {
        node.textContent = formatMoney(event[field]);
        node.title = event[field];
      }
    }
    const notice = document.querySelector("[data-low-notice]");
    if (notice && typeof event.available === "string") {
      notice.hidden = toNanos(event.available) >= toNanos(notice.dataset.threshold);
    }
  }

  function setStatus(text) {
    const status = document.querySelector("[data-live-status]");
    if (status) status.textContent = text;
  }

  function connect(attempt) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(scheme + "//" + location.host + "/ws/events");
    socket.addEventListener("message", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      if (event.type === "balance") {
        applyBalance(event);
        setStatus("Live");
        document.body.dataset.live = "connected";
        attempt = 0;
      }
    });
    socket.addEventListener("close", (close) => {
      document.body.dataset.live = "closed";
      if (close.code === 4401) {
        setStatus("Live updates stopped: please log in again.");
        return;
      }
      setStatus("Live updates reconnecting…");
      // Back off up to 30 s so a restarting server is not hammered by every open tab.
      setTimeout(() => connect(attempt + 1), Math.min(30000, 1000 * 2 ** attempt));
    });
  }

  function setUpCopyButtons() {
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", async () => {
        const input = document.querySelector(button.dataset.copy);
        try {
          await navigator.clipboard.writeText(input.value);
          button.textContent = "Copied";
        } catch (error) {
          input.select(); // clipboard blocked (plain http): leave it selected for Ctrl+C
          button.textContent = "Press Ctrl+C";
        }
      });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    setUpCopyButtons();
    if (document.querySelector("[data-one-time-secret]")) {
      // The secret came in a POST response: turn this history entry into a plain GET so a
      // reload lists the keys instead of re-posting the form (and minting another key).
      history.replaceState(null, "", location.href);
    }
    if (document.querySelector("[data-live-balance]")) connect(0);
  });
})();
