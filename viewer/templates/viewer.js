// Live updates: every 2 s, fetch the server-rendered (escaped) list and swap it in.
// No inline script anywhere: the page's Content-Security-Policy allows only this file.
(function () {
  "use strict";
  var list = document.getElementById("list");
  var select = document.getElementById("model-version");
  if (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  }
  function refresh() {
    var version = list.getAttribute("data-model-version") || "";
    var url = "/anomalies" + (version ? "?model_version=" + encodeURIComponent(version) : "");
    fetch(url, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) { list.innerHTML = html; } })
      .catch(function () {})
      .finally(function () { setTimeout(refresh, 2000); });
  }
  setTimeout(refresh, 2000);
})();
