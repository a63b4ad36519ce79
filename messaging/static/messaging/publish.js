// The publish form: show the queue or the exchange fields for the chosen mode (the form works without it).
(function () {
  "use strict";
  var form = document.getElementById("publish-form");
  if (!form) { return; }
  function sync() {
    var checked = form.querySelector("input[name=mode]:checked");
    var mode = checked ? checked.value : "queue";
    form.querySelectorAll(".mode-queue").forEach(function (el) { el.hidden = mode !== "queue"; });
    form.querySelectorAll(".mode-exchange").forEach(function (el) { el.hidden = mode !== "exchange"; });
  }
  form.querySelectorAll("input[name=mode]").forEach(function (el) { el.addEventListener("change", sync); });
  sync();
}());
