// guardd web console: renders the guard's view from server-sent events and sends kill / re-arm.
// No framework, no build step; every value is written with textContent (never as HTML).
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const body = document.body;
  const $ = (id) => document.getElementById(id);

  function text(el, value) {
    el.textContent = value === null || value === undefined ? "" : String(value);
  }
  function num(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    return Math.abs(value) >= 1000 ? value.toLocaleString("en-US", { maximumFractionDigits: 2 })
      : String(Math.round(value * 10000) / 10000);
  }
  function clock(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
  }
  function row(cells, cls) {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const cell of cells) {
      const td = document.createElement("td");
      text(td, cell);
      tr.appendChild(td);
    }
    return tr;
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function render(view) {
    const state = $("state");
    text(state, view.state + (view.dry_run ? " (dry run)" : ""));
    state.dataset.state = view.state;
    text($("why"), view.why && view.why.length ? view.why.join("; ") : "no breach");
    text($("since"), "since " + clock(view.since) + " · account " + view.account);
    const latch = view.latch_durable === false ? " · LATCH NOT DURABLE: " + view.latch_error : "";
    text($("stream"), "live" + latch);
    $("stream").className = latch ? "error" : "muted";

    const conn = view.connectivity || {};
    const dl = $("connectivity");
    const items = [["IB", conn.ib + " (" + conn.ib_at + ")"],
      ["waiting for", view.waiting_for || "nothing"]];
    if (conn.mqtt !== null && conn.mqtt !== undefined) items.push(["MQTT", conn.mqtt ? "connected" : "disconnected"]);
    dl.replaceChildren();
    for (const [k, v] of items) {
      const dt = document.createElement("dt"); text(dt, k);
      const dd = document.createElement("dd"); text(dd, v);
      dl.append(dt, dd);
    }

    const close = view.close;
    text($("close"), close ? close.kind + " (decision " + close.decision_id + "), round " + close.round
      + ", " + close.children + " orders" + (close.at_target ? ", at target" : ", working")
      + (close.overdue ? ", OVERDUE" : "") : "none");

    fill($("rules").tBodies[0], (view.rules || []).map((r) => row([
      r.rule + (r.subject ? " " + r.subject : ""), num(r.value),
      num(r.limits.warn), num(r.limits.reduce), num(r.limits.kill), r.level,
    ], "level-" + r.level)));
    const positions = view.position_list || [];
    fill($("positions").tBodies[0], positions.length ? positions.map((p) => row([
      p.symbol, p.sec_type, num(p.quantity), num(p.avg_cost)])) : [row(["flat", "", "", ""])]);

    const orders = $("orders");
    orders.replaceChildren();
    const clients = view.orders_by_client || [];
    if (!clients.length) {
      const p = document.createElement("p"); text(p, "none working"); orders.appendChild(p);
    }
    for (const c of clients) {
      const h = document.createElement("h3");
      text(h, "client " + c.client_id + " (" + c.orders.length + ")");
      const table = document.createElement("table");
      const tb = document.createElement("tbody");
      fill(tb, c.orders.map((o) => row([o.order_id, o.action + " " + num(o.quantity) + " " + o.symbol,
        o.order_type + (o.lmt_price !== null ? " " + num(o.lmt_price) : ""), o.status,
        o.own ? "guardd" : ""])));
      table.appendChild(tb);
      orders.append(h, table);
    }

    fill($("journal"), (view.journal || []).map((j) => {
      const li = document.createElement("li");
      const details = Object.entries(j.details || {}).map(([k, v]) => k + "=" + v).join(" ");
      text(li, clock(j.ts) + "  " + j.kind + (details ? "  " + details : ""));
      return li;
    }));

    const you = view.you || {};
    const halted = view.state === "HALTED";
    $("kill-box").hidden = !you.may_kill;
    $("arm-box").hidden = !you.may_arm || !halted;
    $("readonly").hidden = you.may_kill || you.may_arm;
    const rearm = view.rearm || {};
    const pending = $("rearm-pending");
    if (halted && rearm.two_person) {
      pending.hidden = false;
      text(pending, rearm.pending_by
        ? "Re-arm pending by " + rearm.pending_by + ": a second person must confirm before "
          + clock(rearm.lapses_at) + "."
        : "Re-arm needs two people within " + num(rearm.window_s) + " s.");
    } else {
      pending.hidden = true;
    }
  }

  async function post(path, payload) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(payload),
    });
    let answer = {};
    try { answer = await response.json(); } catch (e) { answer = {}; }
    return { status: response.status, answer: answer };
  }
  function say(result) {
    const a = result.answer;
    const el = $("result");
    text(el, (a.message || a.error || "HTTP " + result.status) + (a.state ? " → " + a.state : ""));
    el.className = result.status >= 400 ? "error" : "ok";
  }

  $("kill").addEventListener("click", () => {
    $("kill-confirm").hidden = false;
    $("kill").hidden = true;
    $("kill-reason").focus();
  });
  $("kill-cancel").addEventListener("click", () => {
    $("kill-confirm").hidden = true;
    $("kill").hidden = false;
  });
  $("kill-confirm").addEventListener("submit", async (event) => {
    event.preventDefault();
    const mode = document.querySelector('input[name="mode"]:checked').value;
    $("kill-go").disabled = true;
    try {
      say(await post("/console/kill", { reason: $("kill-reason").value, mode: mode }));
    } finally {
      $("kill-go").disabled = false;
      $("kill-confirm").hidden = true;
      $("kill").hidden = false;
    }
  });
  $("arm-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const payload = { reason: $("arm-reason").value };
    if ($("arm-force").checked) payload.force = true;
    say(await post("/console/arm", payload));
  });
  $("logout").addEventListener("click", async () => {
    await post("/console/logout", {});
    window.location.assign("/console");
  });

  function connect() {
    const source = new EventSource("/console/events");
    source.addEventListener("view", (event) => render(JSON.parse(event.data)));
    source.onerror = () => {
      text($("stream"), "connection lost: reconnecting…");
      $("stream").className = "error";
    };
  }
  if (body.dataset.mayKill !== "true" && body.dataset.mayArm !== "true") {
    $("readonly").hidden = false;
  }
  connect();
})();
