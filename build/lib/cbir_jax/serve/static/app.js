// The search page: a gallery picker, an upload, and one column of top-k results per scorer.
// Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const PAGE = 48;
const state = { size: 0, offset: 0, queryUrl: null };
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

function showQuery(query, imageUrl) {
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = query.row === null ? imageUrl : null;
  $("query-img").src = imageUrl;
  $("query-link").href = query.row === null ? imageUrl : `/image/${query.row}?full=true`;
  const label = query.label ? ` · ${query.label}` : "";
  $("query-caption").textContent = query.row === null ? `uploaded: ${query.id}` : `#${query.row} ${query.id}${label}`;
  $("query-caption").dataset.row = query.row === null ? "upload" : String(query.row);
}

function hitCard(hit) {
  const card = el("div", "hit");
  card.dataset.row = hit.row;
  if (hit.relevant !== null) card.classList.add(hit.relevant ? "relevant" : "irrelevant");
  card.title = "search from this image";
  card.appendChild(thumb(hit.row, hit.id));
  const meta = el("div", "meta");
  const mark = hit.relevant === null ? "" : hit.relevant ? "✓ " : "✗ ";
  meta.appendChild(el("span", "rank", `${mark}#${hit.rank}`));
  const score = el("span", "score", hit.score.toFixed(4));
  score.title = String(hit.score);
  meta.appendChild(score);
  const full = el("a", "full", "⤢");
  full.href = `/image/${hit.row}?full=true`;
  full.target = "_blank";
  full.rel = "noopener";
  full.title = "open full size";
  full.addEventListener("click", (e) => e.stopPropagation());
  meta.appendChild(full);
  card.appendChild(meta);
  card.appendChild(el("div", "id", hit.id));
  card.addEventListener("click", () => searchRow(hit.row));
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
    for (const hit of column.hits) col.appendChild(hitCard(hit));
    box.appendChild(col);
  }
}

async function run(request, imageUrlFor, what) {
  setBusy(true);
  try {
    const body = await getJson(await request());
    showError("");
    showQuery(body.query, imageUrlFor(body.query));
    showResults(body.results);
  } catch (e) {
    showError(`${what}: ${e.message}`);
  } finally {
    setBusy(false);
  }
}

function searchRow(row) {
  return run(() => fetch(`/api/search/${row}`), () => `/image/${row}`, `gallery image #${row}`);
}

function searchUpload(file) {
  const url = URL.createObjectURL(file);
  return run(
    () => fetch("/api/search", { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } }),
    (query) => { query.id = file.name; return url; },
    file.name,
  );
}

async function showPage(offset) {
  state.offset = Math.max(0, Math.min(offset, Math.max(0, state.size - 1)));
  const body = await getJson(await fetch(`/api/gallery?offset=${state.offset}&limit=${PAGE}`));
  const grid = $("gallery");
  grid.replaceChildren();
  for (const item of body.items) {
    const img = thumb(item.row, item.id);
    img.title = item.label ? `${item.id} (${item.label})` : item.id;
    img.dataset.row = item.row;
    img.addEventListener("click", () => searchRow(item.row));
    grid.appendChild(img);
  }
  const last = Math.min(state.offset + PAGE, state.size);
  $("page-info").textContent = `${state.offset + 1}–${last} of ${state.size}`;
}

async function start() {
  const info = await getJson(await fetch(`/api/gallery?limit=1`));
  state.size = info.size;
  const labels = info.labelled ? "labelled (✓ = same class as the query)" : "unlabelled";
  $("info").textContent = `${info.name} · ${info.size} images · ${info.backbone} features · top-${info.k} · ${labels}`;
  $("prev").addEventListener("click", () => showPage(state.offset - PAGE));
  $("next").addEventListener("click", () => { if (state.offset + PAGE < state.size) showPage(state.offset + PAGE); });
  $("random").addEventListener("click", () => searchRow(Math.floor(Math.random() * state.size)));
  $("upload").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    if (file.size > info.max_upload_bytes) {
      showError(`the file is ${file.size.toLocaleString()} bytes; the limit is ${info.max_upload_bytes.toLocaleString()}`);
    } else {
      searchUpload(file);
    }
    e.target.value = "";
  });
  await showPage(0);
  setBusy(false);
}

start().catch((e) => { showError(e.message); setBusy(false); });
