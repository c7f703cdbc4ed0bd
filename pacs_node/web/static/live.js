// Live parts without a framework: an element with data-live="URL" is replaced by the HTML
// fragment at URL every data-every seconds (default 2). No external script, no build step.
(function () {
  function refresh(el) {
    fetch(el.dataset.live, { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) { el.innerHTML = html; el.dataset.refreshed = Date.now(); } })
      .catch(function () { /* node restarting: try again next round */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var every = parseFloat(el.dataset.every || "2") * 1000;
      setInterval(function () { if (!document.hidden) refresh(el); }, every);
    });
  });
})();
