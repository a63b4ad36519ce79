// Live letter page: re-fetch this page every second and swap the #letter section in place, until
// the letter's fate is settled (publish outcome final, every delivery acked/requeued/rejected) or
// a few minutes have passed. A static file, no inline script: the Content-Security-Policy allows
// only scripts from this origin.
(function () {
  "use strict";
  var INTERVAL_MS = 1000;
  var GIVE_UP_MS = 5 * 60 * 1000;
  var FINAL_WITHOUT_DELIVERY = ["unroutable", "failed"];
  var started = Date.now();
  var timer = null;

  function settled(section) {
    var status = section.getAttribute("data-status");
    if (status === "pending") return false;
    if (FINAL_WITHOUT_DELIVERY.indexOf(status) !== -1) return true;
    var rows = section.querySelectorAll("[data-delivery-status]");
    if (rows.length === 0) return false; // published, not delivered yet
    return section.querySelectorAll('[data-delivery-status="received"]').length === 0;
  }

  function schedule() {
    if (Date.now() - started > GIVE_UP_MS) return;
    timer = window.setTimeout(refresh, INTERVAL_MS);
  }

  function refresh() {
    var current = document.getElementById("letter");
    if (!current) return;
    if (document.hidden) { schedule(); return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("letter");
        if (fresh) {
          current.replaceWith(document.importNode(fresh, true));
          if (settled(fresh)) return;
        }
        schedule();
      })
      .catch(schedule);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.getElementById("letter");
    if (section && !settled(section)) schedule();
  });
})();
