// Live updates: every 2 s, fetch the server-rendered (escaped) list and swap it in.
// No inline script anywhere: the page's Content-Security-Policy allows only this file.
(function () {
  "use strict";
  var list = document.getElementById("list");
  var status = document.getElementById("status");
  var select = document.getElementById("model-version");
  if (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  }
  function report(problem) {
    if (status) { status.textContent = problem; }
  }
  function refresh() {
    var version = list.getAttribute("data-model-version") || "";
    var url = "/anomalies" + (version ? "?model_version=" + encodeURIComponent(version) : "");
    fetch(url, { credentials: "same-origin" })
      .then(function (r) {
        // A 503 means Redis is not available: keep the list shown, say so, and try again.
        report(r.ok ? "" : "· last update failed (HTTP " + r.status + "), retrying");
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null) { list.innerHTML = html; } })
      .catch(function () { report("· the viewer is not answering, retrying"); })
      .finally(function () { setTimeout(refresh, 2000); });
  }
  setTimeout(refresh, 2000);
})();
