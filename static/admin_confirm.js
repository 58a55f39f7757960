// Admin forms marked data-confirm="…" ask before they submit (an inline onsubmit would not run
// under the Content-Security-Policy).
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
});
