// Bar charts drawn by hand on <canvas>: no library, crisp on HiDPI screens.

const FONT = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
const PAD = { left: 52, right: 10, top: 12, bottom: 26 };

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** A round step for about `lines` grid lines up to `value` (1, 2, 2.5, 5 × 10^k),
 *  and the axis top: a whole number of steps at or above `value`. */
export function niceAxis(value, { lines = 4, integer = false } = {}) {
  if (!(value > 0)) return integer ? { step: 1, top: 1 } : { step: 0.25, top: 1 };
  const raw = value / lines;
  const exp = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * exp).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.ceil(step));
  return { step, top: step * Math.ceil(value / step - 1e-9) };
}

/** The fewest decimals that write `step` (and so every grid value) exactly. */
export function decimalsFor(step) {
  for (let d = 0; d < 8; d++) {
    const scaled = step * 10 ** d;
    if (Math.abs(scaled - Math.round(scaled)) < 1e-6 * Math.max(1, scaled)) return d;
  }
  return 8;
}

function setup(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.parentElement.clientWidth;
  const height = canvas.clientHeight || Number(canvas.getAttribute("height"));
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return { ctx, width, height };
}

/**
 * Stacked bars, one per minute, with an optional line on top.
 * times: ISO minute starts; series: [{values, color}]; line: {values, color} | null;
 * format(v, step) -> y-axis text; integer: counts (whole-number grid steps).
 */
export function barChart(canvas, { times, series, line = null, format = String, integer = false }) {
  if (!canvas.clientWidth) return; // on a hidden tab: drawn when shown
  const { ctx, width, height } = setup(canvas);
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const n = times.length;
  const totals = times.map((_, i) => series.reduce((s, x) => s + x.values[i], 0));
  const { step, top } = niceAxis(Math.max(...totals, ...(line ? line.values : [0])), { integer });
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  // grid and y labels
  ctx.strokeStyle = css("--grid");
  ctx.fillStyle = css("--muted");
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.lineWidth = 1;
  for (let k = 0; k * step <= top + step / 2; k++) {
    const v = k * step;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(PAD.left, yy);
    ctx.lineTo(width - PAD.right, yy);
    ctx.stroke();
    ctx.fillText(format(v, step), PAD.left - 8, yy);
  }

  // bars
  const slot = plotW / n;
  const barW = Math.max(1, slot * 0.72);
  for (let i = 0; i < n; i++) {
    let base = 0;
    const x = PAD.left + i * slot + (slot - barW) / 2;
    for (const s of series) {
      const v = s.values[i];
      if (v > 0) {
        ctx.fillStyle = s.color;
        const y0 = y(base);
        const y1 = y(base + v);
        ctx.fillRect(x, y1, barW, Math.max(1, y0 - y1));
      }
      base += v;
    }
  }

  // line
  if (line) {
    ctx.strokeStyle = line.color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    line.values.forEach((v, i) => {
      const x = PAD.left + i * slot + slot / 2;
      if (i === 0) ctx.moveTo(x, y(v));
      else ctx.lineTo(x, y(v));
    });
    ctx.stroke();
  }

  // x labels: every 10 minutes, and "now" at the end
  ctx.fillStyle = css("--muted");
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  times.forEach((t, i) => {
    const last = i === n - 1;
    if (!last && (n - 1 - i) % 10 !== 0) return;
    const label = last ? "now" : new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    ctx.fillText(label, PAD.left + i * slot + slot / 2, height - PAD.bottom + 8);
  });
}
