/* The review page: label cells with clicks or single keys, save labels.csv. No network, no library. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("review-data").textContent);
  var cells = data.cells, classes = data.classes, UNSURE = data.unsure;
  var COLOURS = ["#2457c5", "#1e7b45", "#b5476b", "#8a4fbf", "#c76a12", "#177e89", "#6b7a1a", "#a83232",
                 "#4b5563", "#0f5e9c", "#7c3aed", "#9a6b00"];
  var storeKey = "bloodcell-review-" + data.page_id;
  var grid = document.getElementById("grid");
  var nodes = [];          // cell index -> its element
  var visible = [];        // cell indices shown, in page order
  var position = -1;       // selected position in `visible`
  var labels = restore();  // cell index -> label (a class, UNSURE) or null

  function colour(label) {
    if (label === UNSURE) { return null; }
    return COLOURS[classes.indexOf(label) % COLOURS.length];
  }

  function restore() {
    var saved = null;
    try { saved = JSON.parse(window.localStorage.getItem(storeKey) || "null"); } catch (err) { saved = null; }
    var out = [];
    for (var i = 0; i < cells.length; i++) {
      var label = saved && saved[cells[i].path];
      out.push(label && (label === UNSURE || classes.indexOf(label) >= 0) ? label : null);
    }
    return out;
  }

  function remember() {
    var kept = {};
    for (var i = 0; i < cells.length; i++) { if (labels[i]) { kept[cells[i].path] = labels[i]; } }
    try { window.localStorage.setItem(storeKey, JSON.stringify(kept)); } catch (err) { /* storage off: labels live until Save */ }
  }

  function text(tag, className, content) {
    var el = document.createElement(tag);
    if (className) { el.className = className; }
    if (content !== undefined) { el.textContent = content; }
    return el;
  }

  // ----------------------------------------------------------------- legend and filters
  function buildLegend() {
    var legend = document.getElementById("legend");
    classes.forEach(function (name, i) {
      var button = text("button", "class-button");
      button.type = "button";
      button.dataset.label = name;
      var key = text("span", "key", i < data.keyed ? String(i + 1) : "\u00b7");
      key.style.background = colour(name);
      button.appendChild(key);
      button.appendChild(document.createTextNode(name));
      button.title = i < data.keyed ? "key " + (i + 1) : "click to label";
      legend.appendChild(button);
    });
    var unsure = text("button", "unsure-button");
    unsure.type = "button";
    unsure.dataset.label = UNSURE;
    unsure.appendChild(text("span", "key", "0"));
    unsure.appendChild(document.createTextNode("unsure / not a white cell"));
    unsure.title = "key 0 or x";
    legend.appendChild(unsure);
    legend.addEventListener("click", function (event) {
      var button = event.target.closest("button");
      if (button) { setLabel(button.dataset.label); }
    });
    var select = document.getElementById("filter-class");
    var predicted = {};
    cells.forEach(function (cell) { predicted[cell.predicted] = (predicted[cell.predicted] || 0) + 1; });
    classes.concat(Object.keys(predicted).filter(function (c) { return classes.indexOf(c) < 0; })).forEach(function (name) {
      if (!predicted[name]) { return; }
      var option = text("option", "", name + " (" + predicted[name] + ")");
      option.value = name;
      select.appendChild(option);
    });
    ["filter-flag", "filter-class"].forEach(function (id) {
      document.getElementById(id).addEventListener("change", function (event) { event.target.blur(); applyFilters(); });
    });
  }

  // ----------------------------------------------------------------- the grid
  var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (entry.isIntersecting) { showThumb(entry.target); observer.unobserve(entry.target); }
    });
  }, {rootMargin: "400px"}) : null;

  function showThumb(node) {
    var img = node.querySelector("img");
    if (img && !img.src) { img.src = "data:image/jpeg;base64," + cells[Number(node.dataset.i)].thumb; }
  }

  function buildGrid() {
    var fragment = document.createDocumentFragment();
    cells.forEach(function (cell, i) {
      var node = text("div", "cell" + (cell.flag ? " flagged" : ""));
      node.dataset.i = i;
      node.setAttribute("role", "option");
      node.title = cell.path;
      var thumb = text("div", "thumb");
      if (cell.thumb) {
        var img = document.createElement("img");
        img.alt = cell.predicted + " cell";
        img.decoding = "async";
        thumb.appendChild(img);
      } else {
        thumb.appendChild(text("span", "none", "no preview"));
      }
      node.appendChild(thumb);
      node.appendChild(text("span", "num", String(i + 1)));
      var meta = text("div", "meta");
      meta.appendChild(text("span", "pred", cell.predicted));
      meta.appendChild(text("span", "conf", isFinite(cell.confidence) ? cell.confidence.toFixed(2) : ""));
      node.appendChild(meta);
      node.appendChild(text("div", "reason", cell.reason ? cell.reason.replace(/_/g, " ") : ""));
      nodes.push(node);
      fragment.appendChild(node);
      drawLabel(i);
    });
    grid.appendChild(fragment);
    nodes.forEach(function (node) { if (observer) { observer.observe(node); } else { showThumb(node); } });
    grid.addEventListener("click", function (event) {
      var node = event.target.closest(".cell");
      if (node) { select(visible.indexOf(Number(node.dataset.i))); }
    });
  }

  function drawLabel(i) {
    var node = nodes[i], old = node.querySelector(".label");
    if (old) { node.removeChild(old); }
    node.setAttribute("aria-label", cells[i].predicted + (labels[i] ? ", labelled " + labels[i] : ""));
    if (!labels[i]) { return; }
    var badge = text("span", "label" + (labels[i] === UNSURE ? " unsure" : ""), labels[i]);
    if (labels[i] !== UNSURE) { badge.style.background = colour(labels[i]); }
    node.appendChild(badge);
  }

  function passes(i) {
    var flag = document.getElementById("filter-flag").value;
    var predicted = document.getElementById("filter-class").value;
    if (predicted && cells[i].predicted !== predicted) { return false; }
    if (flag === "flagged") { return cells[i].flag; }
    if (flag === "unflagged") { return !cells[i].flag; }
    if (flag === "unlabelled") { return !labels[i]; }
    if (flag === "labelled") { return !!labels[i]; }
    return true;
  }

  function applyFilters(keepPosition) {
    var current = position >= 0 ? visible[position] : -1;
    visible = [];
    cells.forEach(function (cell, i) {
      var shown = passes(i);
      nodes[i].style.display = shown ? "" : "none";
      if (shown) { visible.push(i); }
    });
    document.getElementById("empty").hidden = visible.length > 0;
    var at = visible.indexOf(current);
    if (at < 0) { at = keepPosition !== undefined ? Math.min(keepPosition, visible.length - 1) : (visible.length ? 0 : -1); }
    position = -1;
    select(at);
  }

  function select(at) {
    if (position >= 0 && position < visible.length) { nodes[visible[position]].classList.remove("selected"); }
    nodes.forEach(function (node) { node.classList.remove("selected"); });
    position = at;
    var status = document.getElementById("status");
    if (at < 0 || at >= visible.length) { position = -1; status.textContent = ""; return; }
    var i = visible[at], node = nodes[i], cell = cells[i];
    node.classList.add("selected");
    node.setAttribute("aria-selected", "true");
    node.scrollIntoView({block: "nearest"});
    status.textContent = "cell " + (i + 1) + " of " + cells.length + ": " + cell.path + "  \u2014  predicted " +
      cell.predicted + (isFinite(cell.confidence) ? " (" + cell.confidence.toFixed(3) + ")" : "") +
      (cell.reason ? "  \u2014  " + cell.reason.replace(/_/g, " ") : "") +
      (labels[i] ? "  \u2014  labelled " + labels[i] : "");
  }

  function setLabel(label) {
    if (position < 0) { return; }
    var i = visible[position];
    labels[i] = label;
    drawLabel(i);
    remember();
    progress();
    if (!passes(i)) { applyFilters(position); } else { select(Math.min(position + 1, visible.length - 1)); }
  }

  function clearLabel() {
    if (position < 0) { return; }
    labels[visible[position]] = null;
    drawLabel(visible[position]);
    remember();
    progress();
    if (!passes(visible[position])) { applyFilters(position); } else { select(position); }
  }

  function progress() {
    var done = labels.filter(function (label) { return label; }).length;
    document.getElementById("progress").textContent = done + " of " + cells.length + " labelled";
    document.getElementById("progress-bar").style.width = (cells.length ? 100 * done / cells.length : 0) + "%";
  }

  function columns() {
    return Math.max(1, getComputedStyle(grid).gridTemplateColumns.split(" ").length);
  }

  // ----------------------------------------------------------------- keys
  document.addEventListener("keydown", function (event) {
    var tag = event.target.tagName;
    if (tag === "SELECT" || tag === "INPUT" || tag === "TEXTAREA" || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    var key = event.key, digit = Number(key);
    if (/^[1-9]$/.test(key) && digit <= data.keyed) { setLabel(classes[digit - 1]); }
    else if (key === "0" || key === "x" || key === "X") { setLabel(UNSURE); }
    else if (key === "Backspace" || key === "Delete") { clearLabel(); }
    else if (key === "ArrowRight") { select(Math.min(position + 1, visible.length - 1)); }
    else if (key === "ArrowLeft") { select(Math.max(position - 1, 0)); }
    else if (key === "ArrowDown") { select(Math.min(position + columns(), visible.length - 1)); }
    else if (key === "ArrowUp") { select(Math.max(position - columns(), 0)); }
    else if (key === "Home") { select(0); }
    else if (key === "End") { select(visible.length - 1); }
    else { return; }
    event.preventDefault();
  });

  // ----------------------------------------------------------------- labels.csv
  function field(value) {
    value = String(value);
    return /[",\r\n]/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value;
  }

  function labelsCsv() {
    var boxed = cells.some(function (cell) { return cell.box; });
    var lines = [boxed ? "path,label,xmin,ymin,xmax,ymax" : "path,label"];
    cells.forEach(function (cell, i) {
      if (!labels[i]) { return; }
      var row = [field(cell.path), field(labels[i])];
      if (boxed) { row = row.concat(cell.box ? cell.box.map(String) : ["", "", "", ""]); }
      lines.push(row.join(","));
    });
    return lines.join("\n") + "\n";
  }

  document.getElementById("save").addEventListener("click", function () {
    var blob = new Blob([labelsCsv()], {type: "text/csv"});
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "labels.csv";
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    setTimeout(function () { URL.revokeObjectURL(link.href); }, 1000);
  });

  buildLegend();
  buildGrid();
  progress();
  applyFilters();
})();
