// tokenfleet console script: the live parts only (served as a file; the CSP forbids inline
// script). Pages work without it; it adds countdowns, live status polling, copy buttons,
// confirmation of irreversible actions and a busy state on slow buttons.
(function () {
  "use strict";

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  // <span data-countdown="UNIX_SECONDS">: remaining time as m:ss.
  function tickCountdowns() {
    var now = Math.floor(Date.now() / 1000);
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var left = parseInt(el.getAttribute("data-countdown"), 10) - now;
      el.textContent = left > 0 ? Math.floor(left / 60) + ":" + pad(left % 60) : "expired";
    });
  }

  // <span id="live-status" data-poll="URL">: polls a JSON status until ACTIVE.
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var done = false;
    function once() {
      if (done) { return; }
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (j) {
          if (!j || !j.status) { return; }
          var badge = el.querySelector(".badge");
          var before = badge ? badge.getAttribute("data-status") : "";
          if (badge) {
            badge.textContent = j.status;
            badge.setAttribute("data-status", j.status);
            badge.className = "badge " + j["class"];
          }
          if (j.status === "ACTIVE" || j.status === "REAUTH_REQUIRED" || j.status === "NOT_RETRIEVED") {
            if (before === "CONSENT_PENDING") {
              done = true;
              var box = document.querySelector(".device-code");
              if (box) { box.hidden = true; }
              var msg = document.createElement("div");
              msg.className = "notice " + (j.status === "ACTIVE" ? "ok" : "bad");
              msg.setAttribute("role", "status");
              msg.textContent = j.status === "ACTIVE"
                ? "Consent recorded: the mailbox is ACTIVE."
                : (j.reason || "The sign-in did not complete.") + (j.fix ? " Fix: " + j.fix : "");
              el.closest("section").appendChild(msg);
            }
          }
        })
        .catch(function () { /* try again on the next tick */ });
    }
    once();
    setInterval(once, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("[data-countdown]")) {
      tickCountdowns();
      setInterval(tickCountdowns, 1000);
    }
    var live = document.getElementById("live-status");
    if (live && live.querySelector('[data-status="CONSENT_PENDING"]')) { poll(live); }

    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
    document.querySelectorAll("button[data-busy]").forEach(function (b) {
      b.form.addEventListener("submit", function () {
        b.textContent = b.getAttribute("data-busy");
        setTimeout(function () { b.disabled = true; }, 0);
      });
    });
    document.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.addEventListener("click", function () {
        var input = document.getElementById(b.getAttribute("data-copy"));
        input.select();
        if (navigator.clipboard) { navigator.clipboard.writeText(input.value); }
        b.textContent = "Copied";
      });
    });
  });
})();
