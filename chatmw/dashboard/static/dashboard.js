// The chatmw dashboard. Every figure comes from the metrics API under the page's prefix;
// this script only fetches, formats and draws. Text from the API is inserted with
// textContent, never as HTML. An API key typed into the page is kept in sessionStorage
// (this tab only) and sent as "Authorization: Bearer"; it never goes into the URL.
"use strict";

(function () {
  const body = document.body;
  const api = body.dataset.api;
  const form = document.getElementById("filters");
  const funnelForm = document.getElementById("funnel-form");
  const plotConfig = { displayModeBar: false, responsive: true };
  const keyStorage = "chatmw-dashboard-api-key";
  let registered = new Set();

  // Filters

  function addDay(isoDate) {
    const day = new Date(isoDate + "T00:00:00Z");
    day.setUTCDate(day.getUTCDate() + 1);
    return day.toISOString().slice(0, 10);
  }

  function filterParams() {
    const data = new FormData(form);
    const params = new URLSearchParams();
    const since = data.get("since");
    const to = data.get("to");
    if (since) params.set("since", since);
    // "To" is inclusive on the page; the API's `until` is exclusive.
    if (to) params.set("until", addDay(to));
    params.set("tz", data.get("tz") || "UTC");
    if (data.get("channel")) params.set("channel", data.get("channel"));
    if (data.get("campaign")) params.set("campaign", data.get("campaign"));
    return params;
  }

  function restoreForm() {
    const params = new URLSearchParams(window.location.search);
    for (const name of ["since", "to", "tz", "interval"]) {
      if (params.has(name)) form.elements[name].value = params.get(name);
    }
    if (!form.elements.tz.value) {
      form.elements.tz.value = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    }
    if (params.has("steps")) funnelForm.elements.steps.value = params.get("steps");
    return params;
  }

  function saveForm() {
    const params = new URLSearchParams();
    for (const name of ["since", "to", "tz", "channel", "campaign", "interval"]) {
      const value = form.elements[name].value;
      if (value) params.set(name, value);
    }
    const steps = funnelForm.elements.steps.value.trim();
    if (steps) params.set("steps", steps);
    window.history.replaceState(null, "", "?" + params.toString());
  }

  function fillSelect(select, values, chosen) {
    for (const value of values) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = value;
      select.appendChild(option);
    }
    if (chosen && !values.includes(chosen)) {
      const option = document.createElement("option");
      option.value = chosen;
      option.textContent = chosen;
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
  }

  // Fetching

  function requestHeaders(accept) {
    const headers = { Accept: accept };
    const key = window.sessionStorage.getItem(keyStorage);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  function errorMessage(status, payload) {
    const detail = payload && payload.detail;
    // Metric parameters fail as FastAPI's list of errors; API keys as {error, message}.
    if (Array.isArray(detail) && detail.length) {
      const where = detail[0].loc ? detail[0].loc[detail[0].loc.length - 1] + ": " : "";
      return where + detail[0].msg;
    }
    if (detail && detail.message) {
      const hint = status === 401 ? " (enter an API key above)" : "";
      return detail.message + hint;
    }
    return "HTTP " + status;
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: requestHeaders("application/json") });
    const payload = await response.json().catch(() => null);
    if (!response.ok) throw new Error(errorMessage(response.status, payload));
    return payload;
  }

  function metric(name, extra) {
    const params = filterParams();
    for (const [key, value] of Object.entries(extra || {})) params.set(key, value);
    return getJson(api + "/" + name + "?" + params.toString());
  }

  // Formatting

  function formatCount(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");
  }

  function formatSeconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 60) return value.toFixed(1) + " s";
    if (value < 3600) return (value / 60).toFixed(1) + " min";
    return (value / 3600).toFixed(1) + " h";
  }

  function formatShare(value) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + " %";
  }

  function formatNumber(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function setText(id, text) {
    document.getElementById(id).textContent = text;
  }

  function showError(id, error) {
    const element = document.getElementById(id);
    element.hidden = !error;
    element.textContent = error ? "Could not load: " + error.message : "";
  }

  function fillTable(table, columns, rows) {
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    for (const column of columns) {
      const cell = document.createElement("th");
      cell.textContent = column.label;
      if (column.text) cell.className = "text";
      head.appendChild(cell);
    }
    const tbody = table.createTBody();
    for (const row of rows) {
      const line = tbody.insertRow();
      for (const column of columns) {
        const cell = line.insertCell();
        cell.textContent = column.format(row);
        if (column.text) cell.className = "text";
      }
    }
    if (!rows.length) {
      const cell = tbody.insertRow().insertCell();
      cell.colSpan = columns.length;
      cell.textContent = "No data in this window.";
    }
  }

  // Sections

  async function renderOverview(channels) {
    const summary = await metric("summary");
    setText("tile-conversations", formatCount(summary.totals.conversations));
    setText("tile-users", formatCount(summary.totals.users));
    setText("tile-messages", formatCount(summary.totals.messages));
    setText("tile-first-response", formatSeconds(summary.first_response.p50));

    const sentiment = await metric("sentiment");
    setText("tile-sentiment", formatNumber(sentiment.messages.mean, 2));

    if (registered.has("csat") && registered.has("nps")) {
      const [csat, nps] = await Promise.all([metric("csat"), metric("nps")]);
      setText("tile-csat", csat.score === null ? "–" : csat.score.toFixed(1) + " %");
      setText("tile-nps", nps.nps === null ? "–" : nps.nps.toFixed(0));
    } else {
      showSurveyTotals(channels);
    }

    const box = document.getElementById("tile-conversion-box");
    box.hidden = !registered.has("conversion");
    if (registered.has("conversion")) {
      const conversion = await metric("conversion");
      setText("tile-conversion", formatShare(conversion.conversion_rate));
    }
  }

  // CSAT and NPS over all channels, from the per-channel counts of the channels metric.
  function showSurveyTotals(channels) {
    let responses = 0, satisfied = 0, npsResponses = 0, promoters = 0, detractors = 0, surveys = false;
    for (const row of channels ? channels.channels : []) {
      if (row.csat) { surveys = true; responses += row.csat.answers; satisfied += row.csat.satisfied; }
      if (row.nps) {
        npsResponses += row.nps.answers; promoters += row.nps.promoters; detractors += row.nps.detractors;
      }
    }
    setText("tile-csat", surveys && responses ? (satisfied / responses * 100).toFixed(1) + " %" : "–");
    setText("tile-nps", surveys && npsResponses
      ? ((promoters - detractors) / npsResponses * 100).toFixed(0) : "–");
  }

  async function renderTrend() {
    const interval = form.elements.interval.value;
    const volume = await metric("volume", { interval: interval });
    const x = volume.series.map((row) => row.bucket);
    const traces = ["conversations", "users", "messages"].map((name) => ({
      type: "scatter",
      mode: "lines+markers",
      name: name,
      x: x,
      y: volume.series.map((row) => row[name]),
      yaxis: name === "messages" ? "y2" : "y",
      // Users often equal conversations: a dotted line keeps both visible.
      line: { dash: name === "users" ? "dot" : "solid" },
    }));
    // A single bucket would make plotly zoom to milliseconds around it: pad it by a bucket.
    const xaxis = { type: "date" };
    if (x.length === 1) {
      const days = { day: 1, week: 7, month: 31 }[interval] || 1;
      const at = new Date(x[0]).getTime();
      xaxis.range = [new Date(at - days * 86400000), new Date(at + days * 86400000)];
    }
    window.Plotly.react("trend", traces, {
      margin: { t: 10, r: 60, b: 40, l: 50 },
      xaxis: xaxis,
      yaxis: { title: { text: "conversations, users" }, rangemode: "tozero" },
      yaxis2: { title: { text: "messages" }, overlaying: "y", side: "right", rangemode: "tozero" },
      legend: { orientation: "h" },
    }, plotConfig);
  }

  async function renderHeatmap() {
    const heatmap = await metric("heatmap");
    window.Plotly.react("heatmap", [{
      type: "heatmap",
      z: heatmap.conversations,
      x: heatmap.hours.map((hour) => String(hour).padStart(2, "0") + ":00"),
      y: heatmap.weekdays,
      colorscale: [[0, "#f5f8fc"], [1, "#1f4e9c"]],
      hovertemplate: "%{y} %{x}: %{z} conversations<extra></extra>",
    }], {
      margin: { t: 10, r: 10, b: 40, l: 50 },
      yaxis: { autorange: "reversed" },
    }, plotConfig);
  }

  async function renderFunnel() {
    const steps = funnelForm.elements.steps.value.trim();
    const dropoff = await metric("dropoff", steps ? { steps: steps } : {});
    if (dropoff.funnel && dropoff.funnel.length) {
      setText("funnel-note", "");
      document.getElementById("funnel").hidden = false;
      window.Plotly.react("funnel", [{
        type: "funnel",
        y: dropoff.funnel.map((row) => row.step),
        x: dropoff.funnel.map((row) => row.reached),
        textinfo: "value+percent initial",
      }], { margin: { t: 10, r: 10, b: 30, l: 120 } }, plotConfig);
      return;
    }
    const last = dropoff.last_steps || [];
    const chart = document.getElementById("funnel");
    if (!last.length) {
      setText("funnel-note", "No conversation dropped off in this window.");
      window.Plotly.purge(chart);
      chart.hidden = true;
      return;
    }
    setText("funnel-note", "");
    chart.hidden = false;
    window.Plotly.react("funnel", [{
      type: "bar",
      orientation: "h",
      y: last.map((row) => row.step),
      x: last.map((row) => row.conversations),
    }], {
      margin: { t: 30, r: 10, b: 30, l: 120 },
      title: { text: "Last step of conversations that dropped off", font: { size: 13 } },
      yaxis: { autorange: "reversed" },
    }, plotConfig);
  }

  function renderChannels(result) {
    const table = document.getElementById("channels-table");
    fillTable(table, [
      { label: "Channel", format: (row) => row.channel, text: true },
      { label: "Conversations", format: (row) => formatCount(row.conversations) },
      { label: "Users", format: (row) => formatCount(row.users) },
      { label: "Messages", format: (row) => formatCount(row.messages) },
      { label: "Engagement", format: (row) => formatShare(row.engagement.rate) },
      { label: "Conversion", format: (row) => (row.conversion ? formatShare(row.conversion.rate) : "–") },
      { label: "First response p50", format: (row) => formatSeconds(row.first_response.p50) },
      { label: "Reply time p50", format: (row) => formatSeconds(row.reply_time.p50) },
      { label: "CSAT", format: (row) => (row.csat && row.csat.score !== null ? row.csat.score.toFixed(1) + " %" : "–") },
      { label: "NPS", format: (row) => (row.nps && row.nps.nps !== null ? row.nps.nps.toFixed(0) : "–") },
      { label: "Sentiment", format: (row) => formatNumber(row.sentiment_mean, 2) },
    ], result.channels);
    setText("channels-notes", (result.notes || []).join("; "));
  }

  async function renderAttribution() {
    const result = await metric("attribution");
    const rows = [];
    for (const field of ["campaign", "source", "medium"]) {
      const touches = result.last_touch || {};
      for (const item of touches[field] || []) rows.push({ field: field, ...item });
    }
    fillTable(document.getElementById("attribution-table"), [
      { label: "Field", format: (row) => row.field, text: true },
      { label: "Value", format: (row) => row.value, text: true },
      { label: "Conversations", format: (row) => formatCount(row.conversations) },
      { label: "Users", format: (row) => formatCount(row.users) },
      { label: "Conversions", format: (row) => formatCount(row.conversions) },
      { label: "Revenue", format: (row) => (row.revenue === null ? "–" : row.revenue + (result.currency ? " " + result.currency : "")) },
    ], rows);
  }

  async function renderRetention() {
    const period = form.elements.interval.value;
    const result = await metric("retention", { period: period, periods: "8" });
    const columns = [
      { label: "Cohort", format: (row) => row.cohort.slice(0, 10), text: true },
      { label: "Users", format: (row) => formatCount(row.users) },
    ];
    for (let index = 0; index < 8; index += 1) {
      columns.push({
        label: "+" + (index + 1) + " " + period,
        format: (row) => formatShare(row.following[index].share),
      });
    }
    fillTable(document.getElementById("retention-table"), columns, result.cohorts.slice(-24));
  }

  // Live stream. It is read with fetch rather than EventSource, because EventSource cannot
  // send the Authorization header.

  let liveAbort = null;

  function showSnapshot(snapshot) {
    setText("live-active", formatCount(snapshot.active_conversations));
    setText("live-rate", formatNumber(snapshot.messages_per_minute, 1));
    setText("live-response", formatSeconds(snapshot.response_time_p50));
  }

  function dispatchEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (name === "snapshot" && data.length) showSnapshot(JSON.parse(data.join("\n")));
  }

  async function readLive(url, signal) {
    const response = await fetch(url, { headers: requestHeaders("text/event-stream"), signal: signal });
    if (!response.ok) {
      const payload = await response.json().catch(() => null);
      throw new Error(errorMessage(response.status, payload));
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end = buffer.indexOf("\n\n");
      while (end >= 0) {
        dispatchEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        end = buffer.indexOf("\n\n");
      }
    }
  }

  async function connectLive() {
    if (body.dataset.live !== "true") return;
    if (liveAbort) liveAbort.abort();
    const controller = new AbortController();
    liveAbort = controller;
    document.getElementById("live").hidden = false;
    const params = new URLSearchParams({ interval: "5" });
    if (form.elements.channel.value) params.set("channel", form.elements.channel.value);
    // Reconnect after a dropped stream or a failed request, until the filters change.
    while (!controller.signal.aborted) {
      try {
        await readLive(api + "/live?" + params.toString(), controller.signal);
        showError("live-error", null);
      } catch (error) {
        if (controller.signal.aborted) return;
        showError("live-error", error);
      }
      await new Promise((resolve) => setTimeout(resolve, 5000));
    }
  }

  // Refresh

  async function section(errorId, render) {
    try {
      await render();
      showError(errorId, null);
      return true;
    } catch (error) {
      showError(errorId, error);
      return false;
    }
  }

  async function refresh() {
    body.dataset.state = "loading";
    setText("status", "Loading…");
    saveForm();
    let channels = null;
    const channelsDone = section("channels-error", async () => {
      channels = await metric("channels");
      renderChannels(channels);
    });
    const results = await Promise.all([
      channelsDone.then(() => section("overview-error", () => renderOverview(channels))),
      section("trend-error", renderTrend),
      section("heatmap-error", renderHeatmap),
      registered.has("dropoff") ? section("funnel-error", renderFunnel) : true,
      registered.has("attribution") ? section("attribution-error", renderAttribution) : true,
      section("retention-error", renderRetention),
      channelsDone,
    ]);
    const failed = results.filter((ok) => !ok).length;
    body.dataset.state = failed ? "error" : "ready";
    setText("status", (failed ? failed + " section(s) failed. " : "") +
      "Updated " + new Date().toLocaleTimeString("en-GB") + " · " + (form.elements.tz.value || "UTC"));
  }

  let optionsLoaded = false;

  async function loadOptions(params) {
    try {
      const options = await getJson(api + "/dashboard/options");
      registered = new Set(options.metrics);
      fillSelect(form.elements.channel, options.channels, params.get("channel"));
      fillSelect(form.elements.campaign, options.campaigns, params.get("campaign"));
      optionsLoaded = true;
    } catch (error) {
      setText("status", "Could not load the filter options: " + error.message);
    }
    document.getElementById("funnel-section").hidden = !registered.has("dropoff");
    document.getElementById("attribution-section").hidden = !registered.has("attribution");
  }

  async function start() {
    const params = restoreForm();
    form.elements.key.value = window.sessionStorage.getItem(keyStorage) || "";
    await loadOptions(params);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = form.elements.key.value.trim();
      if (key) window.sessionStorage.setItem(keyStorage, key);
      else window.sessionStorage.removeItem(keyStorage);
      // Options fail without a key on a protected API; load them once a key is given.
      if (!optionsLoaded) await loadOptions(new URLSearchParams(window.location.search));
      connectLive();
      refresh();
    });
    funnelForm.addEventListener("submit", (event) => {
      event.preventDefault();
      saveForm();
      section("funnel-error", renderFunnel);
    });
    connectLive();
    await refresh();
  }

  start();
})();
