// The search page: a gallery picker, an upload, and one grid of top-k results per scorer.
// Text from the server is only ever set with textContent, never parsed as HTML.
// The query, k and the scorers live in the URL (?q=ROW|upload&k=K&scorers=a,b), so back and sharing work.
"use strict";

const PAGE = 48;
const state = { size: 0, offset: 0, info: null, file: null, fileUrl: null, seq: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function getJson(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
  return body;
}

function setBusy(busy) { document.body.dataset.state = busy ? "busy" : "ready"; }

function thumb(row, alt) {
  const img = el("img");
  img.src = `/image/${row}`;
  img.alt = alt;
  img.loading = "lazy";
  return img;
}

// ---- the controls and the URL ------------------------------------------------------------------------

function chosenK() { return $("k").value; }

function chosenScorers() {
  return [...document.querySelectorAll("#scorers input:checked")].map((box) => box.value);
}

function params(q) {
  const p = new URLSearchParams();
  if (q !== null) p.set("q", q);
  p.set("k", chosenK());
  p.set("scorers", chosenScorers().join(","));
  return p;
}

function apiQuery() {
  const p = new URLSearchParams({ k: chosenK(), scorers: chosenScorers().join(",") });
  return p.toString();
}

function remember(q, push) {
  const url = `?${params(q).toString()}`;
  if (url === window.location.search) return;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

function applyUrl() {
  const p = new URLSearchParams(window.location.search);
  $("k").value = p.get("k") || String(state.info.k);
  const wanted = p.get("scorers") ? p.get("scorers").split(",") : state.info.scorers;
  for (const box of document.querySelectorAll("#scorers input")) box.checked = wanted.includes(box.value);
  return p.get("q");
}

// ---- the query and its results ------------------------------------------------------------------------

function clearQuery(caption) {
  $("query-link").hidden = true;
  $("query-img").removeAttribute("src");
  $("query-empty").hidden = false;
  $("query-caption").textContent = caption;
  $("query-caption").dataset.row = "";
  $("results").replaceChildren();
  $("results").hidden = true;
  $("empty").hidden = false;
}

function showQuery(query, imageUrl) {
  $("query-empty").hidden = true;
  $("query-link").hidden = false;
  $("query-img").src = imageUrl;
  $("query-link").href = query.row === null ? imageUrl : `/image/${query.row}?full=true`;
  const label = query.label ? ` · ${query.label}` : "";
  $("query-caption").textContent = query.row === null ? `uploaded: ${query.id}` : `#${query.row} ${query.id}${label}`;
  $("query-caption").dataset.row = query.row === null ? "upload" : String(query.row);
}

// Enough decimals that a column's scores differ where they do (DBA's crowd near 1), and at least 3.
function decimalsFor(hits) {
  const scores = hits.map((h) => h.score);
  const gaps = scores.slice(1).map((s, i) => Math.abs(scores[i] - s)).filter((g) => g > 0);
  if (!gaps.length) return 3;
  return Math.max(3, Math.min(6, Math.ceil(-Math.log10(Math.min(...gaps)))));
}

function hitCard(hit, decimals) {
  const card = el("figure", "hit");
  card.dataset.row = hit.row;
  if (hit.relevant !== null) card.classList.add(hit.relevant ? "relevant" : "irrelevant");
  const label = hit.label ? ` (${hit.label})` : "";
  card.title = `#${hit.rank} ${hit.id}${label}\nscore ${hit.score}\nclick: search from this image`;
  card.appendChild(thumb(hit.row, hit.id));
  const meta = el("figcaption", "meta");
  const mark = hit.relevant === null ? "" : hit.relevant ? "✓" : "✗";
  meta.appendChild(el("span", "rank", `${mark}${hit.rank}`));
  meta.appendChild(el("span", "score", hit.score.toFixed(decimals)));
  const full = el("a", "full", "⤢");
  full.href = `/image/${hit.row}?full=true`;
  full.target = "_blank";
  full.rel = "noopener";
  full.title = "open full size";
  full.addEventListener("click", (e) => e.stopPropagation());
  card.appendChild(full);  // over the thumbnail's corner: the meta line keeps its width for the score
  card.appendChild(meta);
  card.appendChild(el("div", "id", `\u200e${hit.id}\u200e`));  // LRM: rtl only cuts, never reorders
  card.addEventListener("click", () => searchRow(hit.row, true));
  return card;
}

function showResults(results) {
  const box = $("results");
  box.replaceChildren();
  for (const column of results) {
    const col = el("div", "column");
    col.dataset.scorer = column.scorer;
    const head = el("h3");
    head.appendChild(el("span", "name", column.scorer));
    head.appendChild(el("span", "ms", `${column.ms.toFixed(1)} ms`));
    const judged = column.hits.filter((h) => h.relevant !== null);
    if (judged.length) {
      const right = judged.filter((h) => h.relevant).length;
      head.appendChild(el("span", "precision", `${right}/${judged.length} relevant`));
    }
    col.appendChild(head);
    col.appendChild(el("p", "meaning", column.meaning));
    const hits = el("div", "hits");
    const decimals = decimalsFor(column.hits);
    for (const hit of column.hits) hits.appendChild(hitCard(hit, decimals));
    col.appendChild(hits);
    box.appendChild(col);
  }
  $("empty").hidden = true;
  box.hidden = false;
}

async function run(request, imageUrlFor, what, q, push) {
  const seq = ++state.seq;  // answers can arrive out of order: only the latest request's is shown
  setBusy(true);
  try {
    const body = await getJson(await request());
    if (seq !== state.seq) return;
    showError("");
    showQuery(body.query, imageUrlFor(body.query));
    showResults(body.results);
    remember(q, push);
  } catch (e) {
    if (seq !== state.seq) return;
    // Stale results would look like this query's: clear them, and the URL no longer names a query.
    clearQuery("no query");
    showError(`${what}: ${e.message}`);
    remember(null, push);
  } finally {
    if (seq === state.seq) setBusy(false);
  }
}

function searchRow(row, push) {
  return run(() => fetch(`/api/search/${row}?${apiQuery()}`), () => `/image/${row}`, `gallery image #${row}`,
    String(row), push);
}

function searchUpload(file, push) {
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  return run(
    () => fetch(`/api/search?${apiQuery()}`, { method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream" } }),
    (query) => { query.id = file.name; return state.fileUrl; },
    file.name, "upload", push,
  );
}

// The URL says what to show: after a load, a shared link, or the back button.
function showUrl() {
  const q = applyUrl();
  showError("");
  if (q === null) { clearQuery("pick a gallery image or upload one"); return Promise.resolve(); }
  if (q === "upload") {
    if (state.file) return searchUpload(state.file, false);
    clearQuery("the uploaded image is not kept by the server: upload it again");
    return Promise.resolve();
  }
  if (!/^\d+$/.test(q)) { clearQuery("no query"); showError(`q=${q}: not a gallery row`); return Promise.resolve(); }
  return searchRow(Number(q), false);
}

// A changed control re-runs the current query (as a new history entry).
function rerun() {
  const q = $("query-caption").dataset.row;
  if (!chosenScorers().length) { showError("choose at least one scorer"); return; }
  if (q === "upload" && state.file) searchUpload(state.file, true);
  else if (/^\d+$/.test(q)) searchRow(Number(q), true);
  else remember(null, false);
}

// ---- the gallery --------------------------------------------------------------------------------------

async function showPage(offset) {
  state.offset = Math.max(0, Math.min(offset, Math.max(0, state.size - 1)));
  const body = await getJson(await fetch(`/api/gallery?offset=${state.offset}&limit=${PAGE}`));
  const grid = $("gallery");
  grid.replaceChildren();
  for (const item of body.items) {
    const fig = el("figure", "item");
    fig.dataset.row = item.row;
    fig.appendChild(thumb(item.row, item.id));
    fig.appendChild(el("figcaption", null, item.label ? `#${item.row} ${item.id.split("/").pop()} · ${item.label}`
      : `#${item.row} ${item.id.split("/").pop()}`));
    fig.title = item.id;
    fig.addEventListener("click", () => searchRow(item.row, true));
    grid.appendChild(fig);
  }
  const last = Math.min(state.offset + PAGE, state.size);
  $("page-info").textContent = `${state.offset + 1}–${last} of ${state.size}`;
}

async function start() {
  const info = await getJson(await fetch(`/api/gallery?limit=1`));
  state.info = info;
  state.size = info.size;
  const labels = info.labelled ? "labelled (✓ = same class as the query)" : "unlabelled";
  $("info").textContent = `${info.name} · ${info.size} images · ${info.backbone} features · ${labels}`;
  $("empty-labelled").hidden = !info.labelled;
  $("k").max = String(info.max_k);
  for (const name of info.scorers) {
    const label = el("label", "scorer");
    label.title = info.meanings[name];
    const box = el("input");
    box.type = "checkbox";
    box.value = name;
    box.addEventListener("change", rerun);
    label.append(box, ` ${name}`);
    $("scorers").appendChild(label);
  }
  $("k").addEventListener("change", rerun);
  $("prev").addEventListener("click", () => showPage(state.offset - PAGE));
  $("next").addEventListener("click", () => { if (state.offset + PAGE < state.size) showPage(state.offset + PAGE); });
  $("random").addEventListener("click", () => searchRow(Math.floor(Math.random() * state.size), true));
  $("upload").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    if (file.size > info.max_upload_bytes) {
      clearQuery("no query");
      showError(`the file is ${file.size.toLocaleString()} bytes; the limit is ${info.max_upload_bytes.toLocaleString()}`);
      remember(null, true);
    } else {
      searchUpload(file, true);
    }
    e.target.value = "";
  });
  window.addEventListener("popstate", () => { showUrl(); });
  await showPage(0);
  await showUrl();
  setBusy(false);
}

start().catch((e) => { showError(e.message); setBusy(false); });
