// Live numbers on the overview: polls the JSON behind the session every few seconds and updates
// the page in place. Text only goes in through textContent; the chart is the server's own SVG,
// built from numbers alone.
(function () {
  "use strict";
  var main = document.querySelector("main[data-poll]");
  if (!main || !window.fetch) { return; }
  var seconds = parseInt(main.getAttribute("data-poll"), 10) || 5;

  function cell(text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    td.textContent = text;
    return td;
  }

  function rows(list) {
    var body = document.querySelector("[data-rows]");
    if (!body) { return; }
    var fresh = document.createElement("tbody");
    fresh.setAttribute("data-rows", "");
    list.forEach(function (r) {
      var tr = document.createElement("tr");
      var id = cell("", "id");
      var link = document.createElement("a");
      link.href = "/dashboard/requests/" + encodeURIComponent(r.id);
      link.textContent = r.id;
      id.appendChild(link);
      tr.appendChild(id);
      var status = cell("");
      var badge = document.createElement("span");
      badge.className = "badge " + r.status;
      badge.textContent = r.status;
      status.appendChild(badge);
      tr.appendChild(status);
      tr.appendChild(cell(r.endpoint));
      tr.appendChild(cell(r.model));
      tr.appendChild(cell(r.submitted, "when"));
      tr.appendChild(cell(r.duration, "num"));
      tr.appendChild(cell(String(r.attempts), "num"));
      tr.appendChild(cell(r.error_type));
      fresh.appendChild(tr);
    });
    body.parentNode.replaceChild(fresh, body);
    var empty = document.querySelector("[data-empty]");
    if (empty) { empty.hidden = list.length > 0; }
  }

  function show(data) {
    Array.prototype.forEach.call(document.querySelectorAll("[data-field]"), function (el) {
      var name = el.getAttribute("data-field");
      if (Object.prototype.hasOwnProperty.call(data, name)) { el.textContent = String(data[name]); }
    });
    var chart = document.querySelector("[data-chart]");
    if (chart && data.chart) { chart.innerHTML = data.chart; }
    rows(data.recent || []);
    var updated = document.querySelector("[data-field=updated]");
    if (updated) { updated.textContent = "Updated " + new Date().toLocaleTimeString() + "; updates every " + seconds + " s."; }
  }

  function poll() {
    fetch("/dashboard/api/overview", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (reply) {
        if (reply.status === 401) { window.location.assign("/dashboard/sign-in"); return null; }
        return reply.ok ? reply.json() : null;
      })
      .then(function (data) { if (data) { show(data); } })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(poll, seconds * 1000); });
  }
  window.setTimeout(poll, seconds * 1000);
})();
