// The page only draws; everything that talks to Tokentill is in app.py, reached through
// window.pywebview.api. Python pushes changes back by calling window.app.* (run_js).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the assistant message being streamed

function money(value) {
  if (value === null || value === undefined) return "–";
  const n = Number(value); // display only: the app never computes with it
  return "$" + n.toFixed(2);
}

window.app = {
  setState(state) {
    const signedIn = Boolean(state.account);
    $("signin").hidden = signedIn;
    $("chat").hidden = !signedIn;
    $("signout").hidden = !signedIn;
    $("topup").disabled = !signedIn;
    $("account").textContent = state.account || "";
    if (state.balance !== undefined) app.setBalance(state.balance);
  },
  setBalance(balance) {
    const el = $("balance");
    const text = money(balance);
    if (el.textContent !== text) {
      el.textContent = text;
      el.dataset.value = balance === null ? "" : balance;
      el.classList.remove("flash");
      void el.offsetWidth; // restart the animation
      el.classList.add("flash");
    }
  },
  showCode(code, uri) {
    $("signin-code").hidden = false;
    $("signin-code").textContent = code;
    $("signin-status").textContent = "Approve this code in your browser (" + uri + "). Waiting…";
  },
  setSignInStatus(text) { $("signin-status").textContent = text; },
  addUser(text) { return addMessage("user", text); },
  startAssistant() {
    current = addMessage("assistant", "");
    current.classList.add("streaming");
  },
  appendToken(text) {
    current.firstChild.textContent += text;
    $("messages").scrollTop = $("messages").scrollHeight;
  },
  finishAssistant(charge) {
    current.classList.remove("streaming");
    if (charge) {
      const cost = document.createElement("span");
      cost.className = "cost";
      cost.textContent = "cost $" + charge;
      current.appendChild(cost);
    }
    current = null;
    setBusy(false);
  },
  failAssistant(text) {
    if (current) current.remove();
    current = null;
    addMessage("assistant", text).classList.add("error");
    setBusy(false);
  },
  showOutOfCredit(detail) {
    // The composer stays disabled: the refused message goes out by itself once the money arrives.
    if (current) current.remove();
    current = null;
    $("out-of-credit-detail").textContent = detail;
    $("out-of-credit").hidden = false;
    $("topup-continue").disabled = false;
    $("topup-status").textContent = "";
  },
  setTopupStatus(text) { $("topup-status").textContent = text; },
  hideOutOfCredit() { $("out-of-credit").hidden = true; },
  sendMessage(text) { $("prompt").value = text; send(); }, // for keyboard-less automation
};

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.appendChild(document.createTextNode(text));
  $("messages").appendChild(li);
  $("messages").scrollTop = $("messages").scrollHeight;
  return li;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("prompt").disabled = busy;
}

function send() {
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  setBusy(true);
  window.pywebview.api.send(text);
}

function topUp() {
  $("topup-continue").disabled = true;
  $("topup-status").textContent = "Opening the checkout in your browser… the chat continues when the payment arrives.";
  window.pywebview.api.top_up();
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("topup").addEventListener("click", topUp);
$("topup-continue").addEventListener("click", topUp);
$("signin-button").addEventListener("click", () => {
  $("signin-status").textContent = "Opening your browser…";
  window.pywebview.api.sign_in();
});
$("signout").addEventListener("click", () => window.pywebview.api.sign_out());
window.addEventListener("pywebviewready", async () => app.setState(await window.pywebview.api.state()));
