// The console's login: posts the token, and on success loads the console.
"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const body = new URLSearchParams({ token: document.getElementById("token").value });
  try {
    const response = await fetch("/console/login", { method: "POST", body, credentials: "same-origin" });
    if (response.ok) {
      location.reload();
      return;
    }
    const answer = await response.json().catch(() => ({}));
    error.textContent = answer.error || `refused (${response.status})`;
  } catch (e) {
    error.textContent = `the server did not answer: ${e.message}`;
  }
});
