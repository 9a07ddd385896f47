// The hive-bus dashboard: reads the gateway's JSON API every few seconds and follows every task event
// through GET /v1/events. Every piece of data reaches the page through textContent or an attribute,
// never as markup. With tokens configured the API answers 401; the page then asks for a token, keeps it
// in sessionStorage (this tab only) and sends it as a bearer token. EventSource cannot send that
// header, so the feed is read from fetch()'s streamed body.

const TOKEN_KEY = "hive-bus.token";
const POLL_MS = 2000; // stats and workers
const USAGE_EVERY = 3; // polls: tokens and cost change only with completions
const RATE_WINDOW_MS = 60_000;
const MAX_TASK_ROWS = 200;
const DETAIL_CHARS = 240;
const RANK = { queued: 0, running: 1, retrying: 1, completed: 2, failed: 2 };

const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat();

class Unauthorized extends Error {}

let token = sessionStorage.getItem(TOKEN_KEY);
let session = null; // the AbortController of the current polls and feed

// --- the API -----------------------------------------------------------------------------------

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, signal) {
  const response = await fetch(path, { headers: headers({ Accept: "application/json" }), signal });
  if (response.status === 401) throw new Unauthorized();
  if (response.status === 404) return null; // a route this gateway does not serve (/v1/usage)
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  return response.json();
}

// --- building DOM from data, as text ---------------------------------------------------------------

function el(tag, { text, cls, title, data } = {}, ...children) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  if (title) node.title = String(title);
  for (const [key, value] of Object.entries(data || {})) node.dataset[key] = String(value);
  node.append(...children);
  return node;
}

function td(text, cls) {
  return el("td", { text, cls });
}

function fill(table, rows, columns, emptyText) {
  const body = $(table).tBodies[0];
  if (rows.length === 0) {
    const cell = el("td", { text: emptyText, cls: "empty" });
    cell.colSpan = columns;
    body.replaceChildren(el("tr", {}, cell));
  } else {
    body.replaceChildren(...rows);
  }
}

const int = (n) => (n === null || n === undefined ? "–" : numbers.format(n));
const usd = (n) => (n === 0 ? "$0" : `$${n < 1 ? n.toFixed(4) : n.toFixed(2)}`);
const clock = (ms) => new Date(ms).toLocaleTimeString();

function seconds(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s < 120 ? `${s} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
}

// Countdowns and "seconds ago" are refreshed every second from these attributes.
function ticking(node, kind, atMs) {
  node.dataset[kind] = String(atMs);
  tick(node);
  return node;
}

function tick(node) {
  const now = Date.now();
  if (node.dataset.ago) node.textContent = `${seconds(now - Number(node.dataset.ago))} ago`;
  if (node.dataset.until) {
    const left = Number(node.dataset.until) - now;
    node.textContent = left > 0 ? `${seconds(left)} left` : "over";
  }
}

// --- providers, workers, usage -----------------------------------------------------------------

const history = new Map(); // provider -> [[at ms, completed], ...] over the last minute

function perMinute(provider, completed, now) {
  const samples = history.get(provider) || [];
  samples.push([now, completed]);
  while (samples.length > 2 && now - samples[1][0] >= RATE_WINDOW_MS) samples.shift();
  history.set(provider, samples);
  const [firstAt, firstCount] = samples[0];
  if (now - firstAt < 5000) return null; // too short a look to say
  return Math.max(0, ((completed - firstCount) * 60_000) / (now - firstAt));
}

function showStats(stats) {
  const now = Date.now();
  let rate = 0;
  let rated = false;
  const rows = stats.map((s) => {
    const perMin = perMinute(s.provider, s.completed, now);
    if (perMin !== null) {
      rate += perMin;
      rated = true;
    }
    const cooldown = el("td", { text: "–" });
    if (s.cooldown_until_ms) {
      cooldown.className = "cooling";
      cooldown.title = s.cooldown_reason || "";
      ticking(cooldown, "until", s.cooldown_until_ms);
    }
    return el(
      "tr",
      { data: { provider: s.provider } },
      td(s.provider),
      td(int(s.pending), "num"),
      td(int(s.in_flight), "num"),
      td(int(s.retrying), "num"),
      td(int(s.completed), "num"),
      td(int(s.failed), "num"),
      td(perMin === null ? "–" : perMin.toFixed(1), "num"),
      td(int(s.workers), "num"),
      cooldown,
    );
  });
  fill("providers", rows, 9, "no provider has had a task or a worker yet");
  const sum = (key) => stats.reduce((total, s) => total + s[key], 0);
  $("total-rate").textContent = rated ? rate.toFixed(1) : "–";
  $("total-pending").textContent = int(sum("pending"));
  $("total-in-flight").textContent = int(sum("in_flight"));
  providerChoices(stats.map((s) => s.provider));
}

function showWorkers(workers) {
  const rows = workers.map((w) =>
    el(
      "tr",
      { data: { worker: w.worker_id } },
      el("td", { text: w.worker_id, cls: "mono", title: `pid ${w.pid}, version ${w.version}` }),
      td(w.provider),
      td(w.host),
      td(w.state),
      td(`${w.in_flight} / ${w.concurrency}`, "num"),
      td(int(w.completed), "num"),
      td(int(w.failed), "num"),
      ticking(el("td", { title: clock(w.at_ms) }), "ago", w.at_ms),
    ),
  );
  fill("workers", rows, 8, "no worker online");
  $("total-workers").textContent = int(workers.length);
}

function showUsage(usage) {
  if (usage === null) {
    $("usage-since").textContent = "(not counted by this gateway)";
    return;
  }
  $("usage-since").textContent = `since ${clock(usage.since_ms)}`;
  let input = 0;
  let output = 0;
  let cost = 0;
  let unpriced = 0;
  const rows = usage.models.map((m) => {
    input += m.input_tokens;
    output += m.output_tokens;
    cost += m.cost_usd;
    unpriced += m.unpriced;
    const costText = m.unpriced === m.completed ? "no price" : usd(m.cost_usd);
    return el(
      "tr",
      {},
      td(m.provider),
      td(m.model),
      td(int(m.completed), "num"),
      td(int(m.input_tokens), "num"),
      td(int(m.output_tokens), "num"),
      el("td", {
        text: costText,
        cls: "num",
        title: m.unpriced ? `${m.unpriced} task(s) of a model without a known price` : "",
      }),
    );
  });
  fill("usage", rows, 6, "no task completed since then");
  const priced = usage.models.some((m) => m.unpriced < m.completed);
  $("total-tokens").textContent = `${int(input)} / ${int(output)}`;
  $("total-cost").textContent = priced || !unpriced ? usd(cost) : "no price";
  $("total-cost").title = unpriced ? `not counting ${unpriced} task(s) of models without a known price` : "";
}

function providerChoices(providers) {
  const select = $("feed-provider");
  const known = new Set([...select.options].map((o) => o.value));
  for (const provider of providers) {
    if (!known.has(provider)) select.append(el("option", { text: provider }));
  }
}

// --- the live task feed ----------------------------------------------------------------------------

const tasks = new Map(); // task id -> { record, row }

function detailOf(record) {
  const text =
    record.status === "completed"
      ? typeof record.output === "string"
        ? record.output
        : JSON.stringify(record.output)
      : record.status === "queued"
        ? record.prompt
        : record.error
          ? `${record.reason || "error"}: ${record.error}`
          : "";
  const s = text || "";
  return s.length > DETAIL_CHARS ? `${s.slice(0, DETAIL_CHARS)}…` : s;
}

// What a task of messages asks: its last message's text (content is a string or a list of text parts).
function lastMessage(messages) {
  if (!Array.isArray(messages) || !messages.length) return undefined;
  const content = messages[messages.length - 1].content;
  return typeof content === "string" ? content : (content || []).map((part) => part.text || "").join("");
}

// A task's latest state from an event of the feed (see hive_bus/_messages.py for the shapes).
function fromEvent(status, event) {
  return {
    id: event.task_id,
    provider: event.provider,
    status,
    at: event.at_ms,
    attempt: event.attempt || 0,
    worker: event.worker || "",
    prompt: event.task ? event.task.prompt || lastMessage(event.task.messages) : undefined,
    output: event.output,
    error: event.error,
    reason: event.reason,
  };
}

// The same from a TaskView of GET /v1/tasks.
function fromView(view) {
  return {
    id: view.id,
    provider: view.provider,
    status: view.status,
    at: view.updated_at_ms,
    attempt: view.attempt || 0,
    worker: view.worker || "",
    output: view.output,
    error: view.error,
    reason: view.reason,
  };
}

function newer(a, b) {
  return a.at !== b.at ? a.at > b.at : RANK[a.status] >= RANK[b.status];
}

function showTask(record) {
  const known = tasks.get(record.id);
  if (known && !newer(record, known.record)) return; // the feed and the list can cross
  if (known && record.prompt === undefined) record.prompt = known.record.prompt;
  const row = el(
    "tr",
    { cls: known ? "changed" : "", data: { taskId: record.id, status: record.status }, title: record.prompt },
    td(clock(record.at)),
    el("td", { text: record.id, cls: "mono" }),
    td(record.provider),
    el("td", {}, el("span", { text: record.status, cls: "status", data: { status: record.status } })),
    td(record.attempt || "", "num"),
    td(record.worker),
    td(detailOf(record), "detail"),
  );
  const body = $("tasks").tBodies[0];
  if (known) {
    known.row.replaceWith(row);
  } else {
    // ids are ULIDs, so they sort by submission time: keep the newest first
    const after = [...tasks.values()].filter((t) => t.record.id > record.id).length;
    const empty = body.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    body.insertBefore(row, body.children[after] || null);
  }
  tasks.set(record.id, { record, row });
  if (tasks.size > MAX_TASK_ROWS) {
    const oldest = [...tasks.keys()].sort()[0];
    tasks.get(oldest).row.remove();
    tasks.delete(oldest);
  }
}

function clearTasks() {
  tasks.clear();
  fill("tasks", [], 7, "waiting for tasks…");
}

// One Server-Sent Events block ("event: …", "data: …", "id: …" lines) from the stream.
function parseBlock(block) {
  const message = { event: "message", data: [], id: null };
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue; // a comment: the gateway's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") message.event = value;
    else if (field === "data") message.data.push(value);
    else if (field === "id") message.id = value;
  }
  return message.data.length ? { ...message, data: message.data.join("\n") } : null;
}

async function readFeed(provider, signal, lastId, onOpen) {
  const query = provider ? `?provider=${encodeURIComponent(provider)}` : "";
  const extra = { Accept: "text/event-stream" };
  if (lastId) extra["Last-Event-ID"] = lastId;
  const response = await fetch(`/v1/events${query}`, { headers: headers(extra), signal, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error(`the event feed answered ${response.status}`);
  await onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return lastId;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
      const message = parseBlock(buffer.slice(0, end));
      buffer = buffer.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
      if (!message) continue;
      if (message.id) lastId = message.id;
      try {
        showTask(fromEvent(message.event, JSON.parse(message.data)));
      } catch (error) {
        console.warn("skipping an event that does not read", error);
      }
    }
  }
}

// Follows the feed until aborted, reconnecting after the last event seen: nothing is missed.
async function follow(signal) {
  const provider = $("feed-provider").value;
  let lastId = null;
  let pauseMs = 1000;
  while (!signal.aborted) {
    try {
      lastId = await readFeed(provider, signal, lastId, async () => {
        pauseMs = 1000;
        if (lastId === null) await loadRecent(provider, signal);
        document.body.dataset.feed = "live";
        status("live", "live");
      });
      document.body.dataset.feed = "reconnecting"; // the gateway ended this connection
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof Unauthorized) return askForToken();
      document.body.dataset.feed = "reconnecting";
      status("reconnecting", `feed lost (${error.message}); reconnecting`);
    }
    await sleep(pauseMs, signal);
    pauseMs = Math.min(pauseMs * 2, 15_000);
  }
}

// The recent tasks, read once the feed is open, so that no change falls between the two.
async function loadRecent(provider, signal) {
  const query = provider ? `&provider=${encodeURIComponent(provider)}` : "";
  const views = await api(`/v1/tasks?limit=50${query}`, signal);
  clearTasks();
  for (const view of (views || []).reverse()) showTask(fromView(view));
}

// --- the polls, the token, and starting over -----------------------------------------------------

function status(state, text) {
  const pill = $("connection");
  pill.dataset.state = state;
  pill.textContent = text;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function poll(signal) {
  for (let round = 0; !signal.aborted; round++) {
    try {
      const [stats, workers] = await Promise.all([api("/v1/stats", signal), api("/v1/workers", signal)]);
      showStats(stats);
      showWorkers(workers);
      if (round % USAGE_EVERY === 0) showUsage(await api("/v1/usage", signal));
      $("updated").textContent = `updated ${clock(Date.now())}`;
      if (document.body.dataset.feed === "live") status("live", "live");
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof Unauthorized) return askForToken();
      status("offline", `gateway not answering (${error.message})`);
    }
    await sleep(POLL_MS, signal);
  }
}

function askForToken() {
  const refused = token !== null;
  session?.abort();
  document.body.dataset.feed = "token";
  status("token", "token needed");
  $("token-refused").hidden = !refused;
  $("token-form").hidden = false;
  $("board").hidden = true;
  $("token").focus();
}

function start() {
  session?.abort();
  session = new AbortController();
  $("token-form").hidden = true;
  $("board").hidden = false;
  document.body.dataset.feed = "connecting";
  status("connecting", "connecting…");
  clearTasks();
  poll(session.signal);
  follow(session.signal);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  start();
});

$("feed-provider").addEventListener("change", start);

setInterval(() => document.querySelectorAll("[data-ago], [data-until]").forEach(tick), 1000);

start();
