// gemmascope explorer: the two interactive pages. Server data is only ever inserted with
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
  const show = (t) => (t === "" ? "∅" : t.replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥"));
  const chip = (text) => el("span", { class: "chip" }, show(text));

  function setStatus(id, text, isError = false) {
    const s = $(id);
    s.textContent = text;
    s.classList.toggle("err", isError);
  }

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST",
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
        const span = el("span", { class: `tok click${t.special ? " special" : ""}`, "data-i": String(i) }, show(t.text));
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
          box.append(el("a", { href: `/features/${l.id}`, class: "fid" }, `#${l.id}`));
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
        const link = el("a", { href: `/features/${f.id}`, class: "fid" }, `#${f.id}`);
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
        data = await post("/api/fires", { text: $("fires-text").value });
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
        const r = await post("/api/steer", body);
        $("steer-prompt-a").textContent = r.prompt;
        $("steer-prompt-b").textContent = r.prompt;
        $("steer-plain").textContent = r.unsteered;
        $("steer-steered").textContent = r.steered;
        $("steer-title").textContent = `Steered: feature #${r.feature} × ${fmt(r.strength)}`;
        $("steer-result").classList.remove("hidden");
      });
    });
  }
})();
