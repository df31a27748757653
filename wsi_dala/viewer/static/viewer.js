// wsi-dala viewer: the slide (Deep Zoom), one heatmap layer over it, the tumour outlines, a scale bar in µm,
// and a tile's measurements on a click. Everything comes from this run's routes; nothing from elsewhere.
"use strict";
(async function () {
  const info = await (await fetch("info.json")).json();
  const $ = (id) => document.getElementById(id);
  if (info.slide_problem) { $("problem").textContent = info.slide_problem; $("problem").hidden = false; }
  const answer = info.slide_answer || {};
  if (answer.call) {
    $("answer").textContent = `call: ${answer.call} · tumour ${Number(answer.tumour_area_mm2).toFixed(2)} mm²`;
  }
  const viewer = OpenSeadragon({
    id: "view", prefixUrl: "/static/openseadragon/images/", tileSources: "slide.dzi",
    showNavigator: true, maxZoomPixelRatio: 2, crossOriginPolicy: false, drawer: "canvas",
  });
  window.wsiDala = { viewer: viewer, info: info, ready: false };
  const select = $("layer");
  for (const layer of info.layers) {
    const option = document.createElement("option");
    option.value = layer.name; option.textContent = layer.name;
    select.appendChild(option);
  }
  if (info.layers.some((l) => l.name === "tumour")) select.value = "tumour";
  let overlay = null;

  function showLayer() {
    const layer = info.layers.find((l) => l.name === select.value);
    if (overlay) { viewer.world.removeItem(overlay); overlay = null; }
    window.wsiDala.ready = false;
    if (!layer) return;
    $("bar").style.background = `linear-gradient(to right, ${layer.stops.join(",")})`;
    $("bar-high").textContent = Number(layer.top).toFixed(layer.top >= 2 ? 0 : 1);
    $("bar-label").textContent = layer.label;
    const image = new Image();
    image.onload = () => {
      // A layer pixel covers cell_l0 slide pixels from the slide's top-left corner.
      viewer.addTiledImage({
        tileSource: { type: "image", url: `layers/${layer.name}.png` },
        x: 0, y: 0, width: (image.naturalWidth * info.cell_l0) / info.width_l0,
        opacity: Number($("opacity").value),
        success: (event) => {
          overlay = event.item;
          const done = () => { window.wsiDala.ready = true; };
          if (overlay.getFullyLoaded()) done(); else overlay.addOnceHandler("fully-loaded-change", done);
        },
      });
    };
    image.src = `layers/${layer.name}.png`;
  }

  function drawOutlines() {
    const canvas = $("outlines");
    canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!$("regions").checked || !viewer.world.getItemAt(0)) return;
    const slide = viewer.world.getItemAt(0);
    context.strokeStyle = "#00e5ff"; context.lineWidth = 2;
    for (const polygon of info.regions) {  // a polygon: its outline, then its holes
      for (const ring of polygon) {
        context.beginPath();
        ring.forEach(([x, y], i) => {
          const p = slide.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
          if (i === 0) context.moveTo(p.x, p.y); else context.lineTo(p.x, p.y);
        });
        context.closePath(); context.stroke();
      }
    }
  }

  function drawScaleBar() {
    const slide = viewer.world.getItemAt(0);
    if (!slide || !info.mpp) return;
    const a = slide.viewerElementToImageCoordinates(new OpenSeadragon.Point(0, 0));
    const b = slide.viewerElementToImageCoordinates(new OpenSeadragon.Point(100, 0));
    const umPer100px = (b.x - a.x) * info.mpp;
    const nice = [1, 2, 5].flatMap((m) => [1, 10, 100, 1000, 10000].map((k) => m * k)).sort((p, q) => p - q);
    const length = nice.reduce((best, n) => (n <= umPer100px * 1.5 ? n : best), nice[0]);
    $("scalebar-line").style.width = `${(100 * length) / umPer100px}px`;
    $("scalebar-text").textContent = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
  }

  viewer.addHandler("open", () => { showLayer(); drawOutlines(); drawScaleBar(); });
  viewer.addHandler("update-viewport", () => { drawOutlines(); drawScaleBar(); });
  select.addEventListener("change", showLayer);
  $("opacity").addEventListener("input", () => { if (overlay) overlay.setOpacity(Number($("opacity").value)); });
  $("regions").addEventListener("change", drawOutlines);
  viewer.addHandler("canvas-click", async (event) => {
    if (!event.quick) return;
    const slide = viewer.world.getItemAt(0);
    const p = slide.viewerElementToImageCoordinates(event.position);
    const response = await fetch(`tile.json?x=${p.x}&y=${p.y}`);
    const panel = $("tile");
    if (!response.ok) { panel.hidden = true; return; }
    const t = await response.json();
    const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(3));
    panel.replaceChildren();
    const lines = [
      `tile ${t.tile} at (${t.x}, ${t.y})`, `tumour probability ${fmt(t.tumour_probability)}`,
      `SD ${fmt(t.probability_sd)}`, `tissue ${fmt(t.tissue_fraction)}`,
      `QC blur ${fmt(t.blur)} · fold ${fmt(t.fold)} · ink ${fmt(t.ink)}${t.flagged ? " (flagged)" : ""}`,
    ];
    for (const text of lines) { const div = document.createElement("div"); div.textContent = text; panel.appendChild(div); }
    if (t.cam_png) { const img = document.createElement("img"); img.src = t.cam_png; img.alt = "Grad-CAM"; panel.appendChild(img); }
    panel.hidden = false;
  });
})();
