// Draws the dashboard's two charts from the JSON the server rendered into #chart-data,
// and reloads the page every 15 s (the page itself is plain server-rendered HTML).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var common = {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: "index", intersect: false },
    scales: { x: { ticks: { maxTicksLimit: 12 } }, y: { beginAtZero: true } },
  };
  new Chart(document.getElementById("throughput-chart"), {
    type: "line",
    data: {
      labels: data.labels,
      datasets: [
        { label: "jobs finished / min", data: data.jobs_finished, borderColor: "#2563eb", yAxisID: "y" },
        { label: "generated tokens / s", data: data.tokens_per_second, borderColor: "#16a34a", yAxisID: "y1" },
      ],
    },
    options: Object.assign({}, common, {
      scales: Object.assign({}, common.scales, {
        y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } },
      }),
    }),
  });
  new Chart(document.getElementById("latency-chart"), {
    type: "line",
    data: {
      labels: data.labels,
      datasets: [
        { label: "p50 seconds", data: data.latency_p50, borderColor: "#9333ea", spanGaps: true },
        { label: "p95 seconds", data: data.latency_p95, borderColor: "#dc2626", spanGaps: true },
      ],
    },
    options: common,
  });
  window.setTimeout(function () { window.location.reload(); }, 15000);
})();
