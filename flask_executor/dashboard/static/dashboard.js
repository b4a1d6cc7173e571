/* flask-executor dashboard: makes the server-rendered page live.
 * Server-sent events from .../events; polling of the JSON API where a stream
 * cannot be held. Without this script the page still reads (reload to update). */
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page;
  var live = document.getElementById("live");
  var UNFINISHED = { pending: true, running: true };

  function $(root, field) { return root.querySelector('[data-field="' + field + '"]'); }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function clock(ts) {
    if (ts === null || ts === undefined || ts === "") return "—";
    var d = new Date(ts * 1000);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function duration(s) {
    if (s === null || s === undefined) return "—";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
  }
  function bytes(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i ? n.toFixed(1) + " " + units[i] : n + " B";
  }
  function text(el, value) { if (el && el.textContent !== value) el.textContent = value; }
  function setLive(mode) {
    if (!live) return;
    live.className = "live " + mode;
    text(live.querySelector(".live-text"), mode === "on" ? "live" : mode === "polling" ? "polling" : "offline");
  }
  function detailUrl(key) {
    return body.dataset.detail + key.split("/").map(encodeURIComponent).join("/");
  }

  /* Fill one task element (a table row or the detail card) from a JSON row. */
  function fill(el, t) {
    var changed = el.dataset.state !== t.state;
    el.dataset.state = t.state;
    var badge = $(el, "state");
    if (badge) { badge.className = "badge s-" + t.state; text(badge, t.state); }
    var bar = $(el, "bar");
    if (bar) {
      var p = t.progress;
      bar.hidden = p === null && t.state !== "running";
      bar.classList.toggle("indeterminate", p === null && t.state === "running");
      var pct = p === null ? 0 : Math.round(p * 1000) / 10;
      bar.firstElementChild.style.width = pct + "%";
      bar.setAttribute("aria-valuenow", String(Math.round(pct)));
      text($(el, "progress"), p === null ? "" : Math.round(p * 100) + "%");
    }
    var meta = $(el, "meta");
    if (meta) {
      var items = Object.keys(t.meta).filter(function (k) { return k !== "progress"; });
      var html = items.map(function (k) {
        var v = t.meta[k];
        var li = document.createElement("li"), name = document.createElement("span");
        name.textContent = k;
        li.appendChild(name);
        li.appendChild(document.createTextNode(" " + (typeof v === "string" ? v : JSON.stringify(v))));
        return li;
      });
      if (meta.dataset.last !== JSON.stringify(t.meta)) {
        meta.dataset.last = JSON.stringify(t.meta);
        meta.textContent = "";
        html.forEach(function (li) { meta.appendChild(li); });
      }
    }
    ["submitted_at", "started_at", "finished_at"].forEach(function (f) {
      var time = $(el, f);
      if (time) { time.dataset.ts = t[f] === null ? "" : t[f]; text(time, clock(t[f])); }
    });
    var dur = $(el, "duration");
    if (dur) text(dur, duration(t.duration));
    var error = $(el, "error");
    if (error) {
      error.hidden = !t.error_type;
      text($(error, "error_type"), t.error_type || "");
      text($(error, "error_message"), t.error_message || "");
    }
    var cancel = $(el, "cancel");
    if (cancel) cancel.hidden = !UNFINISHED[t.state];
    if (changed && el.tagName === "TR") {
      el.classList.add("flash");
      setTimeout(function () { el.classList.remove("flash"); }, 50);
    }
  }

  /* -- the task list ------------------------------------------------------ */
  var tbody = document.getElementById("tasks");
  var filter = body.dataset.filter || "";
  var rows = {};
  if (tbody) {
    Array.prototype.forEach.call(tbody.querySelectorAll("tr.task"), function (tr) { rows[tr.dataset.key] = tr; });
  }

  function newRow(t) {
    var tr = document.getElementById("row-template").content.firstElementChild.cloneNode(true);
    tr.dataset.key = t.key;
    var link = $(tr, "key");
    link.textContent = t.key;
    link.href = detailUrl(t.key);
    text($(tr, "function"), t.function);
    tr.querySelector('input[name="key"]').value = t.key;
    bindAction(tr.querySelector("form.js-action"));
    return tr;
  }

  function showTask(t) {
    var tr = rows[t.key];
    if (filter && t.state !== filter) { if (tr) removeKey(t.key); return; }
    if (!tr) {
      tr = rows[t.key] = newRow(t);
      var newer = null;  // keep newest submitted first
      Object.keys(rows).forEach(function (k) {
        var other = rows[k];
        if (other !== tr && other.parentNode && Number($(other, "submitted_at").dataset.ts) < t.submitted_at &&
            (!newer || Number($(newer, "submitted_at").dataset.ts) < Number($(other, "submitted_at").dataset.ts))) {
          newer = other;
        }
      });
      tbody.insertBefore(tr, newer);
    }
    fill(tr, t);
  }

  function removeKey(key) {
    var tr = rows[key];
    if (tr && tr.parentNode) tr.parentNode.removeChild(tr);
    delete rows[key];
  }

  var states = {};
  function recount() {
    var counts = { all: 0, pending: 0, running: 0, finished: 0, failed: 0, cancelled: 0 };
    Object.keys(states).forEach(function (k) { counts.all++; counts[states[k]]++; });
    Object.keys(counts).forEach(function (s) {
      var el = document.querySelector('[data-count="' + s + '"]');
      if (el) text(el, String(counts[s]));
    });
    var none = document.getElementById("no-tasks");
    if (none) none.hidden = Object.keys(rows).length > 0;
  }

  function showPool(p) {
    function set(name, value) {
      var el = document.querySelector('[data-pool="' + name + '"]');
      if (el) text(el, value);
    }
    set("backend", p.backend);
    set("live", String(p.workers.length));
    set("configured_workers", p.configured_workers === null ? "auto" : String(p.configured_workers));
    set("busy", p.busy === null ? "—" : String(p.busy));
    set("queue", p.queue === null ? "—" : String(p.queue));
    set("per_second", p.per_second.toFixed(2));
    var wt = document.getElementById("workers");
    if (!wt) return;
    wt.textContent = "";
    if (!p.workers.length) {
      var empty = wt.insertRow();
      empty.className = "empty";
      var cell = empty.insertCell();
      cell.colSpan = 5;
      cell.textContent = p.started ? "No live workers" : "The pool starts on the first task";
    }
    p.workers.forEach(function (w) {
      var tr = wt.insertRow();
      var state = document.createElement("span");
      state.className = w.busy === null ? "muted" : w.busy ? "wbusy" : "widle";
      state.textContent = w.busy === null ? "—" : w.busy ? "busy" : "idle";
      [w.name, w.pid === null ? "—" : String(w.pid), state,
       w.tasks_run === null ? "—" : String(w.tasks_run), bytes(w.memory)].forEach(function (v) {
        var td = tr.insertCell();
        if (typeof v === "string") td.textContent = v; else td.appendChild(v);
      });
    });
  }

  function onTask(t) { states[t.key] = t.state; showTask(t); recount(); }
  function onRemoved(keys) { keys.forEach(function (k) { delete states[k]; removeKey(k); }); recount(); }

  /* -- the detail page -------------------------------------------------------- */
  var card = document.querySelector("section.detail");
  var key = body.dataset.key;
  function onDetail(t, done) {
    fill(card, t);
    // A task that ended while the page was open: reload once for its result.
    if (done && UNFINISHED[body.dataset.state]) location.reload();
  }

  /* -- transports --------------------------------------------------------------- */
  function poll() {
    setLive("polling");
    var url = page === "task" ? body.dataset.taskApi + key.split("/").map(encodeURIComponent).join("/") : body.dataset.api;
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (data) {
        if (page === "task") { onDetail(data, !UNFINISHED[data.state]); return; }
        var seen = {};
        data.tasks.forEach(function (t) { seen[t.key] = true; onTask(t); });
        onRemoved(Object.keys(states).filter(function (k) { return !seen[k]; }));
        showPool(data.pool);
      })
      .catch(function () { setLive("off"); })
      .then(function () { setTimeout(poll, 2000); });
  }

  function stream() {
    if (!window.EventSource) { poll(); return; }
    var url = body.dataset.events + (page === "task" ? "?key=" + encodeURIComponent(key) : "");
    var source = new EventSource(url);
    var opened = false, failures = 0;
    source.onopen = function () { opened = true; failures = 0; setLive("on"); };
    source.onerror = function () {
      // The server ends each stream after a while and the browser reconnects;
      // a stream that never opens (a proxy or server that cannot hold one) means polling.
      failures++;
      if (!opened && failures >= 3) { source.close(); poll(); }
      else if (source.readyState === EventSource.CLOSED) { poll(); }
      opened = false;
    };
    source.addEventListener("task", function (e) {
      var t = JSON.parse(e.data);
      if (page === "task") onDetail(t, false); else onTask(t);
    });
    source.addEventListener("done", function (e) { source.close(); onDetail(JSON.parse(e.data), true); });
    source.addEventListener("missing", function () { source.close(); setLive("off"); });
    source.addEventListener("removed", function (e) { onRemoved(JSON.parse(e.data)); });
    source.addEventListener("keys", function (e) {  // each (re)connect: drop what is gone
      var keep = {};
      JSON.parse(e.data).forEach(function (k) { keep[k] = true; });
      onRemoved(Object.keys(states).filter(function (k) { return !keep[k]; }));
    });
    source.addEventListener("pool", function (e) { showPool(JSON.parse(e.data)); });
  }

  /* -- actions: cancel and purge without leaving the page ------------------------- */
  var toast = document.getElementById("toast"), toastTimer = null;
  function say(message) {
    toast.textContent = message;
    toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { toast.hidden = true; }, 3500);
  }
  function bindAction(form) {
    if (!form || form.dataset.bound) return;
    form.dataset.bound = "1";
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var button = form.querySelector("button");
      button.disabled = true;
      fetch(form.action, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: { Accept: "application/json" }
      }).then(function (r) {
        return r.json().catch(function () { return { message: "HTTP " + r.status }; });
      }).then(function (data) { say(data.message); })
        .catch(function () { say("The request failed"); })
        .then(function () { button.disabled = false; });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("form.js-action"), bindAction);

  /* Relative ages in the tooltip of each time, and running durations. */
  setInterval(function () {
    var now = Date.now() / 1000;
    Array.prototype.forEach.call(document.querySelectorAll("time[data-ts]"), function (el) {
      if (el.dataset.ts) el.title = duration(now - Number(el.dataset.ts)) + " ago";
    });
  }, 1000);

  if (page === "index") {
    Object.keys(rows).forEach(function (k) { states[k] = rows[k].dataset.state; });
  }
  if (page === "index" || (page === "task" && UNFINISHED[body.dataset.state])) stream();
  else setLive("off");
})();
