// gemmascope explorer: the interactive parts of its pages. Server data is only ever inserted with
// textContent / setAttribute, never as markup, so token text cannot run as script.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const fmt = (x) => {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e5 ? String(Number(x.toPrecision(3))) : x.toExponential(2);
  };
  const pct = (d) => (d === 0 ? "0%" : d * 100 >= 0.01 ? `${Number((d * 100).toPrecision(3))}%` : `${(d * 100).toExponential(1)}%`);
  // as views.tok: one ↵ per line break, ⇥ for tabs; an empty token (the first bytes of a character
  // the next token completes) stays empty in a text and shows as ∅ on its own
  const inText = (t) => t.replace(/\r\n/g, "↵").replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  const show = (t) => (t === "" ? "∅" : inText(t));
  const chip = (text) => el("span", { class: "chip" }, show(text));
  const sae = document.body.dataset.sae;
  const featureUrl = (key, id) => `/sae/${encodeURIComponent(key)}/features/${id}`;

  function setStatus(id, text, isError = false) {
    const s = $(id);
    s.textContent = text;
    s.classList.toggle("err", isError);
  }

  async function post(url, body, method = "POST") {
    const r = await fetch(url, {
      method,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const d = data.detail;
      const msg = Array.isArray(d) ? d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ") : d;
      throw new Error(msg || `request failed (${r.status})`);
    }
    return data;
  }

  async function get(url) {
    const r = await fetch(url);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : `request failed (${r.status})`);
    return data;
  }

  async function submit(form, statusId, busyText, work) {
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    setStatus(statusId, busyText);
    try {
      await work();
      setStatus(statusId, "");
    } catch (err) {
      setStatus(statusId, err.message, true);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- what fires here
  const firesForm = $("fires-form");
  if (firesForm) {
    let data = null;
    let selected = null;

    const select = (id) => {
      selected = id;
      const f = data.features.find((x) => x.id === id);
      const scale = f ? (f.index_max_act > 0 ? f.index_max_act : f.max_act) : 1;
      for (const tr of $("fires-features").querySelectorAll("tbody tr")) {
        tr.classList.toggle("sel", Number(tr.dataset.id) === id);
      }
      const box = $("fires-tokens");
      box.replaceChildren();
      data.tokens.forEach((t, i) => {
        const act = f ? f.acts[i] : 0;
        const span = el("span", { class: `tok click${t.special ? " special" : ""}${t.text ? "" : " part"}`, "data-i": String(i) }, inText(t.text));
        span.style.setProperty("--a", act > 0 ? String(Math.min(act / scale, 1)) : "0");
        span.title = f ? `${t.text} · #${id}: ${fmt(act)}` : t.text;
        span.addEventListener("click", () => detail(i));
        box.append(span);
      });
      $("fires-selected").textContent = f ? `— coloured by feature #${id}; click a token for its features` : "";
    };

    const detail = (i) => {
      const t = data.tokens[i];
      for (const s of $("fires-tokens").children) s.classList.toggle("chosen", Number(s.dataset.i) === i);
      const box = $("fires-detail");
      box.replaceChildren(el("b", {}, "Token "), chip(t.text), document.createTextNode(" "));
      if (t.special) {
        box.append(el("span", { class: "muted" }, "special token: never counted"));
      } else if (!t.latents.length) {
        box.append(el("span", { class: "muted" }, "no feature fires here"));
      } else {
        box.append(document.createTextNode("fires "));
        t.latents.forEach((l, j) => {
          if (j) box.append(document.createTextNode(", "));
          box.append(el("a", { href: featureUrl(sae, l.id), class: "fid" }, `#${l.id}`));
          box.append(document.createTextNode(` (${fmt(l.act)})`));
        });
      }
    };

    const render = () => {
      $("fires-result").classList.remove("hidden");
      const body = $("fires-features").querySelector("tbody");
      body.replaceChildren();
      for (const f of data.features) {
        const tr = el("tr", { "data-id": String(f.id) });
        const link = el("a", { href: featureUrl(sae, f.id), class: "fid" }, `#${f.id}`);
        const lens = el("td", { class: "chips" });
        (f.lens_top || []).forEach((t) => lens.append(chip(t)));
        tr.append(el("td"), el("td", { class: "num" }, fmt(f.max_act)), el("td", { class: "num" }, fmt(f.index_max_act)),
          el("td", { class: "num" }, f.density === undefined ? "–" : pct(f.density)), lens);
        tr.firstChild.append(link);
        tr.style.cursor = "pointer";
        tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") select(f.id); });
        body.append(tr);
      }
      if (!data.features.length) {
        const td = el("td", { colspan: "5", class: "muted" }, "No feature fires on this text.");
        body.append(el("tr"));
        body.lastChild.append(td);
      }
      $("fires-detail").replaceChildren();
      select(data.features.length ? data.features[0].id : null);
    };

    firesForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      submit(firesForm, "fires-status", "Running the model… (the first request loads it)", async () => {
        data = await post(`/api/sae/${encodeURIComponent(sae)}/fires`, { text: $("fires-text").value });
        render();
      });
    });
  }

  // ---------------------------------------------------------------- steering
  const steerForm = $("steer-form");
  if (steerForm) {
    steerForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      submit(steerForm, "steer-status", "Generating… (the first request loads the model)", async () => {
        const body = {
          prompt: $("steer-prompt").value,
          feature: Number.parseInt($("steer-feature").value, 10),
          strength: Number.parseFloat($("steer-strength").value),
          max_new_tokens: Number.parseInt($("steer-tokens").value, 10),
        };
        const r = await post(`/api/sae/${encodeURIComponent(sae)}/steer`, body);
        $("steer-prompt-a").textContent = r.prompt;
        $("steer-prompt-b").textContent = r.prompt;
        $("steer-plain").textContent = r.unsteered;
        $("steer-steered").textContent = r.steered;
        $("steer-title").textContent = `Steered: feature #${r.feature} × ${fmt(r.strength)}`;
        $("steer-result").classList.remove("hidden");
      });
    });
  }
  // ---------------------------------------------------------------- a latent: explanation, neighbours, co-firing
  const latentTable = (items, extra) => {
    const table = el("table", { class: "features latents" });
    const body = el("tbody");
    for (const x of items) {
      const tr = el("tr");
      const td = el("td");
      td.append(el("a", { href: featureUrl(x.sae, x.id), class: "fid" }, `#${x.id}`));
      const lens = el("td", { class: "chips" });
      (x.lens_top || []).forEach((t) => lens.append(chip(t)));
      tr.append(td, el("td", { class: "num" }, extra(x)), lens, el("td", { class: "expl" }, x.explanation || ""));
      body.append(tr);
    }
    table.append(body);
    return table;
  };

  const card = $("explanation-card");
  if (card) {
    const form = $("explanation-form");
    const toggle = (editing) => {
      form.classList.toggle("hidden", !editing);
      $("explanation-edit").classList.toggle("hidden", editing);
      if (editing) $("explanation-text").focus();
    };
    $("explanation-edit").addEventListener("click", () => toggle(true));
    $("explanation-cancel").addEventListener("click", () => toggle(false));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      submit(form, "explanation-status", "Saving…", async () => {
        const url = `${featureUrl(sae, card.dataset.feature).replace("/sae/", "/api/sae/")}/explanation`;
        const r = await post(url, { text: $("explanation-text").value }, "PUT");
        const p = $("explanation");
        p.replaceChildren();
        if (r.explanation) p.textContent = r.explanation.text;
        else p.append(el("span", { class: "muted" }, "No explanation yet."));
        toggle(false);
      });
    });

    const load = async (id, render) => {
      const box = $(id);
      try {
        const data = await get(box.dataset.url);
        $(`${id}-status`).textContent = "";
        render(data, $(`${id}-body`));
      } catch (err) {
        $(`${id}-status`).textContent = err.message;
        $(`${id}-status`).classList.add("err");
      }
    };
    const cos = (x) => `cos ${fmt(x.cos)}`;
    load("neighbours", (d, body) => {
      body.append(el("h3", {}, "In this SAE"), latentTable(d.within, cos));
      const groups = [...d.other_saes.map((g) => [`${g.label}`, g]),
        ...(d.previous ? [[`Previous layer here: ${d.previous.label}`, d.previous]] : []),
        ...(d.next ? [[`Next layer here: ${d.next.label}`, d.next]] : [])];
      for (const [title, g] of groups) {
        const h = el("h3");
        h.append(el("a", { href: `/sae/${encodeURIComponent(g.key)}` }, title));
        body.append(h, latentTable(g.latents, cos));
      }
    });
    load("cofiring", (d, body) => {
      if (!d.latents.length) body.append(el("p", { class: "muted" }, "Nothing else fires at its peaks."));
      else body.append(latentTable(d.latents, (x) => `${x.together} of ${x.of}`));
    });
  }

  // ---------------------------------------------------------------- the prompt heat-map
  const promptForm = $("prompt-form");
  if (promptForm) {
    let data = null;
    const detail = (row, i) => {
      const box = $("prompt-detail");
      const t = data.tokens[i];
      box.replaceChildren(el("b", {}, `${row.label}, token `), chip(t.text), document.createTextNode(" "));
      const cell = row.cells[i];
      if (!cell.length) box.append(el("span", { class: "muted" }, "nothing fires here"));
      cell.forEach((l, j) => {
        if (j) box.append(document.createTextNode(", "));
        box.append(el("a", { href: featureUrl(row.key, l.id), class: "fid" }, `#${l.id}`));
        box.append(document.createTextNode(` (${fmt(l.act)}, ${Math.round(100 * l.frac)}% of its max)`));
      });
    };
    const render = () => {
      const table = $("prompt-heat");
      table.replaceChildren();
      const head = el("tr");
      head.append(el("th", {}, "SAE"));
      data.tokens.forEach((t) => head.append(el("th", { class: `tokhead${t.special ? " special" : ""}` }, inText(t.text))));
      const thead = el("thead");
      thead.append(head);
      const tbody = el("tbody");
      for (const row of data.rows) {
        const tr = el("tr");
        const name = el("th", { class: "rowhead" });
        name.append(el("a", { href: `/sae/${encodeURIComponent(row.key)}` }, `L${row.layer} ${row.site}`));
        tr.append(name);
        row.cells.forEach((cell, i) => {
          const top = cell[0];
          const td = el("td", { class: "cell", title: top ? `#${top.id}: ${fmt(top.act)}` : "" }, top ? String(top.id) : "");
          td.style.setProperty("--a", top ? String(top.frac) : "0");
          td.addEventListener("click", () => {
            for (const c of table.querySelectorAll("td.chosen")) c.classList.remove("chosen");
            td.classList.add("chosen");
            detail(row, i);
          });
          tr.append(td);
        });
        tbody.append(tr);
      }
      table.append(thead, tbody);
      $("prompt-detail").replaceChildren();
      $("prompt-result").classList.remove("hidden");
    };
    promptForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      submit(promptForm, "prompt-status", "Running the model and every SAE… (the first request loads them)", async () => {
        const sites = [...promptForm.querySelectorAll("input[name=site]:checked")].map((x) => x.value);
        const l0 = $("prompt-l0").value;
        data = await post("/api/prompt", {
          text: $("prompt-text").value, sites, width: Number.parseInt($("prompt-width").value, 10),
          l0: l0 === "" ? null : Number.parseFloat(l0),
        });
        render();
      });
    });
  }
})();
