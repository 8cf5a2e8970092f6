// vit_lens explorers: one ES module for the three views (anywidget's render({model, el}) contract).
// Plain DOM and SVG, no dependencies, so it runs offline in JupyterLab, Notebook 7, VS Code and in
// the static pages that to_html writes (there `model` is a small stand-in holding the saved state).
// Every number drawn is also written to a data-value attribute, for tests and for tooltips.

const SVG = "http://www.w3.org/2000/svg";

function element(tag, attributes = {}, parent = null, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function format(value) {
  return value === null || value === undefined ? "n/a" : Number(value).toPrecision(4);
}

// Blue / white / red around 0 for signed values (positive blue, as plotly's RdBu).
function diverging(value, max) {
  if (value === null || value === undefined) return "rgb(220,220,220)";
  const t = max > 0 ? Math.max(-1, Math.min(1, value / max)) : 0;
  const mix = (a, b) => Math.round(a + (b - a) * Math.abs(t));
  return t >= 0 ? `rgb(${mix(255, 33)},${mix(255, 102)},${mix(255, 172)})` : `rgb(${mix(255, 178)},${mix(255, 24)},${mix(255, 43)})`;
}

function absMax(rows) {
  let max = 0;
  for (const row of rows) for (const v of row) if (v !== null) max = Math.max(max, Math.abs(v));
  return max;
}

function patchLabel(token, nPrefix, cols, labels) {
  if (labels && labels[token]) return labels[token];
  const p = token - nPrefix;
  return `P(${Math.floor(p / cols)},${p % cols})`;
}

// An image with a clickable patch grid drawn over it; `cell(token)` gives fill / opacity / title.
function patchGrid(parent, { imageUrl, rows, cols, nPrefix, size, className, cell, onCell, onPress }) {
  const wrap = element("div", { class: `vl-stage ${className || ""}`, style: `width:${size}px;height:${size}px` }, parent);
  if (imageUrl) element("img", { src: imageUrl, width: size, height: size, draggable: "false" }, wrap);
  const svg = element("svg:svg", { width: size, height: size, viewBox: `0 0 ${cols} ${rows}`, preserveAspectRatio: "none" }, wrap);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const token = nPrefix + r * cols + c;
      const look = cell(token);
      const rect = element("svg:rect", {
        x: c, y: r, width: 1, height: 1, class: "vl-patch", "data-token": token,
        "data-value": look.value === undefined ? "" : look.value, fill: look.fill, "fill-opacity": look.opacity,
      }, svg);
      if (look.title) element("svg:title", {}, rect, look.title);
      if (look.selected) rect.classList.add("vl-selected");
      if (onCell) rect.addEventListener("click", () => onCell(token));
      if (onPress) {
        rect.addEventListener("mousedown", (event) => { event.preventDefault(); onPress(token, "down"); });
        rect.addEventListener("mouseenter", () => onPress(token, "enter"));
      }
    }
  }
  return wrap;
}

// Keys pressed on a view's controls (arrows on a slider) are the control's: JupyterLab and Notebook
// 7 would otherwise read them as notebook shortcuts (select the next cell) and cancel them.
function controlBar(parent) {
  const bar = element("div", { class: "vl-controls", "data-lm-suppress-shortcuts": "true" }, parent);
  bar.addEventListener("keydown", (event) => event.stopPropagation());
  return bar;
}

function slider(parent, name, max, value, onInput) {
  const label = element("label", { class: "vl-control" }, parent, `${name} `);
  const input = element("input", { type: "range", min: 0, max, step: 1, value, class: `vl-${name}` }, label);
  const shown = element("span", { class: `vl-${name}-value` }, label, String(value));
  input.addEventListener("input", () => { shown.textContent = input.value; onInput(Number(input.value)); });
  return input;
}

function status(parent, model) {
  const line = element("div", { class: "vl-status" }, parent);
  const update = () => {
    const error = model.get("error");
    line.textContent = error ? error : model.get("busy") ? "computing ..." : "";
    line.classList.toggle("vl-error", Boolean(error));
  };
  model.on("change:busy", update);
  model.on("change:error", update);
  update();
  return line;
}

// ------------------------------------------------------------------------------------ patch explorer

function renderPatch(model, el) {
  const root = element("div", { class: "vl-view vl-patch-explorer" }, el);
  const [rows, cols] = model.get("grid");
  const nPrefix = model.get("n_prefix");
  const labels = model.get("token_labels");
  const controls = controlBar(root);
  slider(controls, "layer", model.get("n_layers") - 1, model.get("layer"), (v) => { model.set("layer", v); model.save_changes(); draw(); });
  slider(controls, "head", model.get("n_heads") - 1, model.get("head"), (v) => { model.set("head", v); model.save_changes(); draw(); });
  const prefixButtons = element("span", { class: "vl-prefix" }, controls);
  for (let token = 0; token < nPrefix; token++) {
    const button = element("button", { class: "vl-prefix-token", "data-token": token }, prefixButtons, labels[token]);
    button.addEventListener("click", () => choose(token));
  }
  const query = element("div", { class: "vl-query" }, root);
  const body = element("div", { class: "vl-body" }, root);
  const readout = element("div", { class: "vl-readout" }, root);
  const terms = element("ol", { class: "vl-terms" }, root);
  status(root, model);

  function choose(token) {
    const table = model.get("_all_attention");
    if (model.get("_static")) {
      // a static page of a large model carries the saved query's attention only
      if (!table || !table.length) {
        readout.textContent = "static snapshot: this page holds the saved query only; open it in a kernel for others";
        return;
      }
      model.set("attention_rows", table[token]);
    }
    model.set("query", token);
    model.save_changes();
  }

  function draw() {
    const rowsOf = model.get("attention_rows");
    const layer = model.get("layer"), head = model.get("head"), q = model.get("query");
    const attention = rowsOf.length ? rowsOf[layer][head] : [];
    const max = Math.max(...attention.slice(nPrefix), 1e-12);
    query.textContent = `query ${labels[q]}, layer ${layer}, head ${head}`;
    query.setAttribute("data-query", q);
    body.replaceChildren();
    patchGrid(body, {
      imageUrl: model.get("image_url"), rows, cols, nPrefix, size: 320, className: "vl-attention",
      cell: (token) => ({
        // opacity follows the weight, so the image shows through where the patch does not look
        value: attention[token], fill: "rgb(33,102,172)", opacity: 0.85 * Math.min(1, (attention[token] || 0) / max), selected: token === q,
        title: `${labels[token]}: ${format(attention[token])}`,
      }),
      onCell: choose,
    });
    for (const button of prefixButtons.children) {
      const token = Number(button.getAttribute("data-token"));
      button.setAttribute("data-value", attention[token]);
      button.textContent = `${labels[token]} ${format(attention[token])}`;
      button.classList.toggle("vl-selected", token === q);
    }
    let best = nPrefix;
    for (let token = nPrefix; token < attention.length; token++) if (attention[token] > attention[best]) best = token;
    readout.replaceChildren();
    element("span", { class: "vl-max", "data-token": best, "data-value": attention[best] }, readout,
      `most attended patch ${labels[best]} (${format(attention[best])})`);
    const onPatches = attention.slice(nPrefix).reduce((a, b) => a + b, 0);
    element("span", { class: "vl-patch-share", "data-value": onPatches }, readout, ` · on patches ${format(onPatches)}`);
    terms.replaceChildren();
    for (const term of model.get("terms")) {
      element("li", { "data-value": term.value }, terms, `${term.head} · "${term.text}" ${format(term.value)}`);
    }
  }
  for (const name of ["attention_rows", "layer", "head", "query", "terms"]) model.on(`change:${name}`, draw);
  draw();
}

// --------------------------------------------------------------------------------- patching explorer

function renderPatching(model, el) {
  const root = element("div", { class: "vl-view vl-patching-explorer" }, el);
  const [rows, cols] = model.get("grid");
  const nPrefix = model.get("n_prefix");
  const labels = model.get("token_labels");
  const controls = controlBar(root);
  const select = (name, options, value) => {
    const label = element("label", { class: "vl-control" }, controls, `${name} `);
    const node = element("select", { class: `vl-${name}` }, label);
    for (const option of options) element("option", { value: option }, node, option);
    node.value = value;
    node.addEventListener("change", () => { model.set(name, node.value); model.save_changes(); });
    return node;
  };
  const metric = select("metric", model.get("metric_names"), model.get("metric"));
  const fill = select("fill", model.get("fills"), model.get("fill"));
  const clear = element("button", { class: "vl-clear-region" }, controls, "clear region");
  clear.addEventListener("click", () => { model.set("region", []); model.save_changes(); });
  if (model.get("_static")) element("span", { class: "vl-note" }, controls, "static snapshot: open in a kernel to re-run patching");
  const images = element("div", { class: "vl-images" }, root);
  const baselines = element("div", { class: "vl-baselines" }, root);
  status(root, model);
  element("h4", {}, root, "patching resid_pre, layer × position (0 = corrupted run, 1 = clean run)");
  const positions = element("div", { class: "vl-position-maps" }, root);
  element("h4", {}, root, "patching each head's z, layer × head");
  const heads = element("div", { class: "vl-head-map" }, root);

  // Painting: press on a patch and drag; the region is sent once, when the button is released.
  let painting = null;
  const paint = (token, phase) => {
    if (model.get("_static")) return;
    const patch = token - nPrefix;
    if (phase === "down") painting = { add: !model.get("region").includes(patch), region: new Set(model.get("region")) };
    if (!painting) return;
    if (painting.add) painting.region.add(patch); else painting.region.delete(patch);
    for (const rect of images.querySelectorAll(".vl-paint .vl-patch")) {
      const p = Number(rect.getAttribute("data-token")) - nPrefix;
      rect.setAttribute("fill-opacity", painting.region.has(p) ? 0.55 : 0);
    }
  };
  const finish = () => {
    if (!painting) return;
    const region = [...painting.region].sort((a, b) => a - b);
    painting = null;
    model.set("region", region);
    model.save_changes();
  };
  root.addEventListener("mouseup", finish);
  root.addEventListener("mouseleave", finish);

  function drawImages() {
    images.replaceChildren();
    const region = new Set(model.get("region"));
    const clean = element("figure", {}, images);
    patchGrid(clean, {
      imageUrl: model.get("clean_url"), rows, cols, nPrefix, size: 192, className: "vl-paint",
      cell: (token) => ({ fill: "rgb(255,200,0)", opacity: region.has(token - nPrefix) ? 0.55 : 0, title: labels[token] }),
      onPress: paint,
    });
    element("figcaption", {}, clean, model.get("fill") === "image" ? "clean" : "clean: paint the region to corrupt");
    const corrupted = element("figure", {}, images);
    element("img", { src: model.get("corrupted_url"), width: 192, height: 192, class: "vl-corrupted" }, corrupted);
    element("figcaption", {}, corrupted, `corrupted (${model.get("fill")})`);
  }

  function drawResults() {
    const values = model.get("position_values");
    const headValues = model.get("head_values");
    const layerLabels = model.get("layer_labels");
    const base = model.get("baselines");
    baselines.textContent = `metric: clean ${format(base.clean)}, corrupted ${format(base.corrupted)}` +
      (base.normalized ? "" : " (equal: values shown unnormalised)");
    baselines.setAttribute("data-clean", base.clean);
    baselines.setAttribute("data-corrupted", base.corrupted);
    const max = Math.max(absMax(values), absMax(headValues), 1e-12);
    positions.replaceChildren();
    values.forEach((row, layer) => {
      const panel = element("figure", { class: "vl-position-layer", "data-layer": layer }, positions);
      const prefix = element("div", { class: "vl-prefix-cells" }, panel);
      for (let token = 0; token < nPrefix; token++) {
        element("span", { class: "vl-cell", "data-token": token, "data-value": row[token], style: `background:${diverging(row[token], max)}`,
          title: `${labels[token]}: ${format(row[token])}` }, prefix, labels[token]);
      }
      patchGrid(panel, {
        imageUrl: null, rows, cols, nPrefix, size: 120, className: "vl-position-grid",
        cell: (token) => ({ value: row[token], fill: diverging(row[token], max), opacity: 1, title: `${labels[token]}: ${format(row[token])}` }),
      });
      element("figcaption", {}, panel, layerLabels[layer]);
    });
    heads.replaceChildren();
    const headLabels = model.get("head_labels");
    const cell = 22;
    const svg = element("svg:svg", { width: 40 + cell * headLabels.length, height: 20 + cell * headValues.length }, heads);
    headLabels.forEach((label, h) => element("svg:text", { x: 40 + cell * h + cell / 2, y: 14, "text-anchor": "middle" }, svg, label));
    headValues.forEach((row, layer) => {
      element("svg:text", { x: 2, y: 20 + cell * layer + cell * 0.7 }, svg, layerLabels[layer]);
      row.forEach((value, h) => {
        const rect = element("svg:rect", { x: 40 + cell * h, y: 20 + cell * layer, width: cell - 1, height: cell - 1, class: "vl-head-cell",
          "data-layer": layer, "data-head": h, "data-value": value, fill: diverging(value, max) }, svg);
        element("svg:title", {}, rect, `${layerLabels[layer]} ${headLabels[h]}: ${format(value)}`);
      });
    });
  }
  model.on("change:region", drawImages);
  model.on("change:corrupted_url", drawImages);
  model.on("change:fill", () => { fill.value = model.get("fill"); drawImages(); });
  model.on("change:metric", () => { metric.value = model.get("metric"); });
  for (const name of ["position_values", "head_values", "baselines"]) model.on(`change:${name}`, drawResults);
  drawImages();
  drawResults();
}

// ---------------------------------------------------------------------------- decomposition explorer

function renderDecomposition(model, el) {
  const root = element("div", { class: "vl-view vl-decomposition-explorer" }, el);
  const controls = controlBar(root);
  const label = element("label", { class: "vl-control" }, controls, "direction ");
  const direction = element("select", { class: "vl-direction" }, label);
  model.get("direction_names").forEach((name, i) => element("option", { value: i }, direction, name));
  direction.value = model.get("direction");
  direction.addEventListener("change", () => { model.set("direction", Number(direction.value)); model.save_changes(); draw(); });
  const layout = element("div", { class: "vl-body" }, root);
  const table = element("table", { class: "vl-heads" }, layout);
  const side = element("div", { class: "vl-side" }, layout);
  const top = element("div", { class: "vl-top-images" }, side, "hover a head for its top images");
  const tokens = element("div", { class: "vl-token-map" }, side);
  status(root, model);
  let sort = { key: "value", descending: true };

  function draw() {
    const d = model.get("direction");
    const labels = model.get("head_labels");
    const means = model.get("head_means")[d];
    const order = labels.map((_, i) => i);
    const key = (i) => (sort.key === "head" ? i : sort.key === "abs" ? Math.abs(means[i]) : means[i]);
    order.sort((a, b) => (sort.descending ? key(b) - key(a) : key(a) - key(b)));
    table.replaceChildren();
    const header = element("tr", {}, element("thead", {}, table));
    for (const [name, text] of [["head", "head"], ["value", "mean contribution"], ["abs", "|contribution|"]]) {
      const th = element("th", { "data-sort": name }, header, text + (sort.key === name ? (sort.descending ? " ▼" : " ▲") : ""));
      th.addEventListener("click", () => { sort = { key: name, descending: sort.key === name ? !sort.descending : true }; draw(); });
    }
    const body = element("tbody", {}, table);
    const max = Math.max(...means.map(Math.abs), 1e-12);
    for (const i of order) {
      const row = element("tr", { class: "vl-head-row", "data-head": labels[i], "data-value": means[i] }, body);
      if (labels[i] === model.get("selected_head")) row.classList.add("vl-selected");
      element("td", {}, row, labels[i]);
      element("td", { style: `background:${diverging(means[i], max)}` }, row, format(means[i]));
      element("td", {}, row, format(Math.abs(means[i])));
      row.addEventListener("mouseenter", () => showTop(i));
      row.addEventListener("click", () => {
        model.set("selected_head", labels[i]);
        model.save_changes();
        draw();
      });
    }
  }

  function showTop(i) {
    const d = model.get("direction");
    const thumbnails = model.get("thumbnails");
    top.replaceChildren();
    element("div", {}, top, `top images of ${model.get("head_labels")[i]}`);
    for (const index of model.get("top_images")[d][i]) {
      element("img", { src: thumbnails[index], width: 72, height: 72, "data-image": index, title: `image ${index}` }, top);
    }
  }

  function drawTokens() {
    const values = model.get("token_values");
    tokens.replaceChildren();
    if (!model.get("selected_head")) return;
    if (!values.length) {
      element("div", {}, tokens, model.get("_static") ? "static snapshot: the head x token map needs a kernel" : "");
      return;
    }
    const [rows, cols] = model.get("grid");
    const nPrefix = model.get("n_prefix");
    const max = Math.max(...values.map((v) => Math.abs(v)), 1e-12);
    element("div", {}, tokens, `${model.get("selected_head")} per token (mean over images); prefix ${values.slice(0, nPrefix).map(format).join(", ")}`);
    patchGrid(tokens, {
      imageUrl: null, rows, cols, nPrefix, size: 160, className: "vl-token-grid",
      cell: (token) => ({ value: values[token], fill: diverging(values[token], max), opacity: 1, title: format(values[token]) }),
    });
  }
  model.on("change:token_values", drawTokens);
  model.on("change:head_means", draw);
  draw();
  drawTokens();
}

const VIEWS = { patch: renderPatch, patching: renderPatching, decomposition: renderDecomposition };

function render({ model, el }) {
  const view = VIEWS[model.get("_view")];
  if (!view) {
    el.textContent = `vit_lens widgets: unknown view ${JSON.stringify(model.get("_view"))}`;
    return;
  }
  view(model, el);
}

export default { render };
