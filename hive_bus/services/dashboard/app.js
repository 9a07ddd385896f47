// The hive-bus dashboard: reads the gateway's JSON API every few seconds and follows every task event
// through GET /v1/events. Every piece of data reaches the page through textContent or an attribute,
// never as markup. With tokens configured the API answers 401; the page then asks for a token, keeps it
// in sessionStorage (this tab only) and sends it as a bearer token. EventSource cannot send that
// header, so the feed is read from fetch()'s streamed body.

import { Charts, merge } from "./charts.js";

const TOKEN_KEY = "hive-bus.token";
const POLL_MS = 2000; // stats, workers and problems
const USAGE_EVERY = 3; // polls: tokens and cost change only with completions
const HISTORY_EVERY = 5; // polls: the charts' last minutes (the hour is read once)
const DLQ_EVERY = 15; // polls: dead letters (and whenever the problems' count of them changes)
const BATCHES_EVERY = 3; // polls: the batches' progress
const BATCH_ENDS = ["completed", "failed", "expired", "cancelled"];
const RATE_WINDOW_MS = 60_000;
const MAX_TASK_ROWS = 200;
const DETAIL_CHARS = 240;
const RANK = { scheduled: 0, queued: 0, running: 1, retrying: 1, completed: 2, failed: 2, cancelled: 2 };
const ENDS = ["completed", "failed", "cancelled"];

const $ = (id) => document.getElementById(id);
const numbers = new Intl.NumberFormat();

class Unauthorized extends Error {}

let token = sessionStorage.getItem(TOKEN_KEY);
let session = null; // the AbortController of the current polls and feed

// --- the API -----------------------------------------------------------------------------------

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, signal, method = "GET") {
  const response = await fetch(path, { method, headers: headers({ Accept: "application/json" }), signal });
  if (response.status === 401) throw new Unauthorized();
  if (response.status === 404) return null; // a route this gateway does not serve (/v1/usage), no such task
  if (!response.ok) {
    let message = `${path} answered ${response.status}`;
    try {
      message = (await response.json()).error.message || message;
    } catch {
      // not the gateway's error body: the status says enough
    }
    throw new Error(message);
  }
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
    const row = el(
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
    row.id = `provider-${s.provider}`; // where the problem strip links to
    return row;
  });
  fill("providers", rows, 9, "no provider has had a task or a worker yet");
  const sum = (key) => stats.reduce((total, s) => total + s[key], 0);
  if (rated) {
    $("total-rate").textContent = rate.toFixed(1);
    $("total-rate").title = "over the last minute this page has watched";
  } else if (hour && hour.completed.length > 1) {
    // the page has not watched a minute yet: the last whole minute, as the bus recorded it
    $("total-rate").textContent = int(hour.completed.at(-2));
    $("total-rate").title = "in the last whole minute, read from the bus";
  }
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
      : record.status === "queued" || record.status === "scheduled"
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
    // a queued event whose task still has a not_before is a submission that waits for its time
    status: status === "queued" && event.task && event.task.not_before ? "scheduled" : status,
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
  // A worker's word after the end (the running event of a call being abandoned, or of a twin delivery
  // whose run another worker completed) does not undo it, as the task reads; a replay's queued does.
  if (ENDS.includes(b.status) && RANK[a.status] === 1) return false;
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
    el("td", {}, storyButton(record.id)),
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
  storyChanged(record.id);
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

// --- what needs a person -------------------------------------------------------------------------

const PROBLEM_WORDS = {
  stale: "Stale figures",
  no_worker: "No worker",
  key_refused: "Key refused",
  cooling_down: "Cooling down",
  dead_letters: "Dead letters",
  stream_lost: "Messages lost",
  webhooks_failing: "Webhooks failing",
};

// Shows the strip (hidden when nothing is wrong); returns how many dead letters wait.
function showProblems(problems) {
  let dead = 0;
  const items = (problems || []).map((p) => {
    if (p.kind === "dead_letters") dead = p.count;
    const link = el("a", { text: p.message });
    link.href = p.link;
    const item = el("li", { data: { kind: p.kind, provider: p.provider || "" } });
    item.append(el("span", { text: `${PROBLEM_WORDS[p.kind] || p.kind}:`, cls: "kind" }), link);
    if (p.until_ms) item.append(" ", ticking(el("span", { cls: "cooling" }), "until", p.until_ms));
    return item;
  });
  $("problem-list").replaceChildren(...items);
  $("problems").hidden = items.length === 0;
  return dead;
}

// --- the last hour ---------------------------------------------------------------------------------

const charts = new Charts();
let hour = null; // the history as last merged

async function loadHistory(signal) {
  const history = await api("/v1/stats/history", signal);
  if (history === null) return; // a gateway that does not follow the bus
  hour = history;
  showHistory();
}

async function updateHistory(signal) {
  // an hour the gateway was still reading when it answered has minutes that no update brings: read it whole
  if (hour === null || !hour.backfilled) return loadHistory(signal);
  const since = hour.start_ms.at(-1) ?? 0; // the current minute, which has grown since
  const update = await api(`/v1/stats/history?since_ms=${since}`, signal);
  if (update === null || update.start_ms.length === 0) return;
  hour = merge(hour, update);
  showHistory();
}

function showHistory() {
  charts.show(hour);
  $("history-note").textContent = hour.backfilled ? "" : "(still reading the hour before this gateway started)";
}

// --- batches ----------------------------------------------------------------------------------------

async function loadBatches(signal) {
  const list = await api("/v1/batches?limit=20", signal);
  if (list === null) return; // a gateway without batches
  const rows = list.data.map((batch) => {
    const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    const ended = counts.completed + counts.failed;
    const bar = el("progress", { title: `${ended} of ${counts.total} lines ended` });
    bar.max = Math.max(1, counts.total);
    bar.value = ended;
    const failed = counts.failed ? ` (${int(counts.failed)} failed)` : "";
    const progress = batch.progress || {};
    const eta = progress.estimated_finish_at ? new Date(progress.estimated_finish_at * 1000).toLocaleString() : "–";
    const actions = el("td", { cls: "actions" });
    if (!BATCH_ENDS.includes(batch.status) && batch.status !== "cancelling") {
      const cancel = el("button", { text: "Cancel…", cls: "danger", title: "its queued lines never run" });
      cancel.type = "button";
      cancel.addEventListener("click", () => cancelBatch(batch.id));
      actions.append(cancel);
    }
    return el(
      "tr",
      { data: { batchId: batch.id, status: batch.status } },
      td(new Date(batch.created_at * 1000).toLocaleString()),
      td(batch.id),
      el("td", {}, el("span", { text: batch.status, cls: "status", data: { status: batch.status } })),
      el("td", { cls: "progress" }, bar, ` ${int(ended)} / ${int(counts.total)}${failed}`),
      td(progress.per_minute ? `${progress.per_minute.toFixed(1)}/min` : "–"),
      el("td", { text: eta, title: progress.basis || "" }),
      actions,
    );
  });
  fill("batch-table", rows, 7, "no batch yet: upload a JSON Lines file and create one (POST /v1/batches, or hive batch create FILE)");
  $("batch-count").textContent = list.data.length ? `(${list.data.length}${list.has_more ? "+" : ""})` : "";
}

async function cancelBatch(batchId) {
  if (!confirm(`Cancel batch ${batchId}? Its queued lines will not run; the finished ones stay in its output.`)) return;
  const message = $("batch-message");
  message.textContent = `Cancel of ${batchId}…`;
  try {
    await api(`/v1/batches/${encodeURIComponent(batchId)}/cancel`, session?.signal, "POST");
    message.textContent = `Cancel of ${batchId}: cancelling`;
    await loadBatches(session?.signal);
  } catch (error) {
    if (error instanceof Unauthorized) return askForToken();
    message.textContent = `Cancel of ${batchId} failed: ${error.message}`;
  }
}

// --- schedules ----------------------------------------------------------------------------------------

const RECENT_RUNS_SHOWN = 5;

function actionButton(text, cls, title, onClick) {
  const button = el("button", { text, cls, title });
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

async function loadSchedules(signal) {
  const list = await api("/v1/schedules", signal);
  if (list === null) return; // a gateway without schedules
  const rows = list.schedules.map((schedule) => {
    const state = schedule.paused ? "paused" : "active";
    const next = schedule.paused ? "–" : schedule.next_at ? new Date(schedule.next_at).toLocaleString() : "after its first firing";
    const runs = el("td", { cls: "runs" });
    for (const run of schedule.runs.slice(-RECENT_RUNS_SHOWN).reverse()) {
      // each run opens its task's whole story
      runs.append(actionButton(clock(run.at_ms), "link", `task ${run.task_id}: its whole story`, () => openStory(run.task_id)), " ");
    }
    const actions = el(
      "td",
      { cls: "actions" },
      schedule.paused
        ? actionButton("Resume", "secondary", "fire it again", () => changeSchedule(schedule.id, "resume"))
        : actionButton("Pause", "secondary", "no firing until resumed", () => changeSchedule(schedule.id, "pause")),
      " ",
      actionButton("Delete…", "danger", "remove it (its tasks stay)", () => deleteSchedule(schedule.id, schedule.name)),
    );
    const zone = schedule.time_zone ? ` (${schedule.time_zone})` : "";
    return el(
      "tr",
      { data: { scheduleId: schedule.id, paused: schedule.paused } },
      el("td", { text: schedule.name || schedule.id, title: `${schedule.id} -> ${schedule.task.provider}` }),
      el("td", { text: `${schedule.rule}${zone}`, cls: "mono" }),
      el("td", {}, el("span", { text: state, cls: "status", data: { status: state } })),
      td(next),
      td(int(schedule.fired), "num"),
      runs,
      actions,
    );
  });
  fill("schedule-table", rows, 7, "no schedule yet: POST /v1/schedules, or hive schedule add PROVIDER PROMPT --every 1h");
  $("schedule-count").textContent = list.schedules.length ? `(${list.schedules.length})` : "";
}

async function changeSchedule(scheduleId, action) {
  const message = $("schedule-message");
  try {
    await api(`/v1/schedules/${encodeURIComponent(scheduleId)}/${action}`, session?.signal, "POST");
    message.textContent = `${scheduleId}: ${action === "pause" ? "paused" : "resumed"}`;
    await loadSchedules(session?.signal);
  } catch (error) {
    if (error instanceof Unauthorized) return askForToken();
    message.textContent = `${action} of ${scheduleId} failed: ${error.message}`;
  }
}

async function deleteSchedule(scheduleId, name) {
  if (!confirm(`Delete schedule ${name || scheduleId}? It will not fire again; the tasks it submitted stay.`)) return;
  const message = $("schedule-message");
  try {
    await api(`/v1/schedules/${encodeURIComponent(scheduleId)}`, session?.signal, "DELETE");
    message.textContent = `${scheduleId}: deleted`;
    await loadSchedules(session?.signal);
  } catch (error) {
    if (error instanceof Unauthorized) return askForToken();
    message.textContent = `Delete of ${scheduleId} failed: ${error.message}`;
  }
}

// --- dead letters ----------------------------------------------------------------------------------

let shownDeadLetters = -1;

async function loadDeadLetters(signal, count) {
  const letters = await api("/v1/dlq?limit=100", signal);
  if (letters === null) return;
  shownDeadLetters = count ?? letters.length;
  const rows = letters.map(({ failed }) => {
    const replay = el("button", { text: "Replay", cls: "secondary", title: "queue it again (same id, its next run)" });
    replay.type = "button";
    replay.addEventListener("click", () => replayTask(failed.task_id, $("dlq-message")));
    const purge = el("button", { text: "Purge…", cls: "danger", title: "drop this dead letter for good" });
    purge.type = "button";
    purge.addEventListener("click", () => purgeOne(failed.task_id));
    const error = failed.error.length > DETAIL_CHARS ? `${failed.error.slice(0, DETAIL_CHARS)}…` : failed.error;
    return el(
      "tr",
      { data: { taskId: failed.task_id } },
      td(clock(failed.at_ms)),
      el("td", {}, storyButton(failed.task_id)),
      td(failed.provider),
      td(failed.reason),
      el("td", { text: error, cls: "detail", title: failed.error }),
      el("td", { cls: "actions" }, replay, purge),
    );
  });
  fill("dlq-table", rows, 6, "no dead letter: every task that failed for good has been replayed or purged");
  $("dlq-count").textContent = letters.length ? `(${letters.length}${letters.length === 100 ? "+" : ""})` : "";
  $("dlq-purge-all").hidden = letters.length === 0;
}

// --- webhooks failing ------------------------------------------------------------------------------

const WEBHOOKS_SHOWN = 50;
let shownWebhookTrouble = 0;

// The deliveries that need a person (retrying now, given up, or refused), read with this page's token: the
// problem strip links here rather than to the JSON route, which a browser tab would open without it.
async function loadWebhooks(signal, trouble) {
  shownWebhookTrouble = trouble;
  if (trouble === 0) {
    $("webhooks").hidden = true;
    return;
  }
  const list = await api(`/v1/webhooks/deliveries?status=retrying&status=failed&status=refused&limit=${WEBHOOKS_SHOWN}`, signal);
  if (list === null) return;
  const rows = list.deliveries.map((d) => {
    const error = d.last_error || "";
    const shortError = error.length > DETAIL_CHARS ? `${error.slice(0, DETAIL_CHARS)}…` : error;
    const next = d.next_try_at_ms ? ticking(el("span"), "until", d.next_try_at_ms) : "–";
    return el(
      "tr",
      { data: { deliveryId: d.id, status: d.status } },
      td(clock(d.updated_at_ms)),
      el("td", {}, storyButton(d.task_id)),
      td(d.event),
      el("td", { text: d.url, cls: "detail mono", title: d.url }),
      el("td", {}, el("span", { text: d.status, cls: "status", data: { status: d.status } })),
      td(int(d.attempts), "num"),
      el("td", { text: shortError, cls: "detail", title: error }),
      el("td", {}, next),
    );
  });
  fill("webhook-table", rows, 8, "no delivery is failing now");
  const many = list.deliveries.length === WEBHOOKS_SHOWN ? "+" : "";
  $("webhook-count").textContent = `(${list.deliveries.length}${many}; the newest first)`;
  $("webhooks").hidden = false;
}

async function act(message, what, path, method) {
  message.textContent = `${what}…`;
  try {
    const answer = await api(path, session?.signal, method);
    if (answer === null) throw new Error("it is no longer there");
    message.textContent =
      answer.purged !== undefined ? `${what}: ${answer.purged} dead letter(s) dropped`
      : answer.status === "cancelled" ? `${what}: cancelled`
      : `${what}: queued again (run ${answer.run})`;
    await loadDeadLetters(session?.signal);
    return answer;
  } catch (error) {
    if (error instanceof Unauthorized) return askForToken();
    message.textContent = `${what} failed: ${error.message}`;
    return null;
  }
}

function replayTask(taskId, message) {
  return act(message, `Replay of ${taskId}`, `/v1/dlq/${encodeURIComponent(taskId)}/replay`, "POST");
}

function cancelTask(taskId, message) {
  if (!confirm(`Cancel task ${taskId}? A queued task will not run; a running one is stopped.`)) return null;
  return act(message, `Cancel of ${taskId}`, `/v1/tasks/${encodeURIComponent(taskId)}/cancel`, "POST");
}

function purgeOne(taskId) {
  if (!confirm(`Drop the dead letter of task ${taskId} for good? It cannot be replayed afterwards.`)) return;
  return act($("dlq-message"), `Purge of ${taskId}`, `/v1/dlq/${encodeURIComponent(taskId)}`, "DELETE");
}

function purgeAll() {
  if (!confirm("Drop EVERY dead letter for good? None of them can be replayed afterwards.")) return;
  return act($("dlq-message"), "Purge of every dead letter", "/v1/dlq", "DELETE");
}

// --- a task's whole story ------------------------------------------------------------------------------

let story = null; // the AbortController of the open story's event stream

function storyButton(taskId) {
  const button = el("button", { text: taskId, cls: "link", title: "its whole story" });
  button.type = "button";
  button.addEventListener("click", () => openStory(taskId));
  return button;
}

function fact(list, term, value) {
  if (value === null || value === undefined || value === "") return;
  list.append(el("dt", { text: term }), el("dd", { text: value }));
}

function pretty(value) {
  if (typeof value === "string") {
    try {
      const parsed = JSON.parse(value);
      if (parsed !== null && typeof parsed === "object") return JSON.stringify(parsed, null, 2);
    } catch {
      // plain text
    }
    return value;
  }
  return value === null || value === undefined ? "" : JSON.stringify(value, null, 2);
}

// What the task asks; with ``facts``, how it is to run too (a task view, with its events evicted, has
// only what it asks and its metadata).
function showAsked(task, { facts = true } = {}) {
  const box = $("task-input");
  const parts = [];
  if (task.system) parts.push(message("system", task.system));
  for (const m of task.messages || []) {
    const text = typeof m.content === "string" ? m.content : m.content.map((part) => part.text).join("\n");
    parts.push(message(m.role, text));
  }
  if (task.prompt) parts.push(message("prompt", task.prompt));
  if (task.payload !== undefined && task.payload !== null) parts.push(message("payload", pretty(task.payload)));
  if (task.content) parts.push(el("p", { cls: "muted", text: `its content (${int(task.content.size_bytes)} bytes) is kept in the Object Store` }));
  box.replaceChildren(...parts);
  const meta = $("task-facts");
  if (!facts) {
    if (task.metadata && Object.keys(task.metadata).length) fact(meta, "metadata", JSON.stringify(task.metadata));
    return;
  }
  fact(meta, "priority", task.priority || "normal");
  fact(meta, "model", task.model);
  if (task.fallback && task.fallback.length) fact(meta, "fallback", task.fallback.join(", "));
  if (task.metadata && Object.keys(task.metadata).length) fact(meta, "metadata", JSON.stringify(task.metadata));
  if (task.params) fact(meta, "params", JSON.stringify(task.params));
  if (task.response_format) fact(meta, "response format", task.response_format.type);
  fact(meta, "attempts allowed", task.max_attempts);
}

function message(role, text) {
  return el("div", { cls: "message" }, el("span", { text: role, cls: "role" }), el("pre", { text }));
}

// One line of the timeline from an event of GET /v1/tasks/{id}/events.
function timelineItem(status, e) {
  const item = el("li", { data: { status } });
  const words = [];
  let what;
  switch (status) {
    case "queued":
      what = e.task && e.task.not_before
        ? `scheduled on ${e.provider} for ${e.task.not_before}`
        : e.task && e.task.run ? `queued again on ${e.provider} (replay, run ${e.task.run})` : `queued on ${e.provider}`;
      break;
    case "running":
      what = `attempt ${e.attempt} running on ${e.worker}`;
      break;
    case "retrying":
      what = `waits (${e.reason}${e.quota ? `, ${e.quota}` : ""}) after attempt ${e.attempt} on ${e.worker}`;
      words.push(`next try in ${e.retry_in_s.toFixed(1)} s, at ${clock(e.next_try_at_ms)}`);
      if (e.error) words.push(`the provider said: ${e.error}`);
      break;
    case "moved":
      what = `moved from ${e.provider} to ${e.task.provider}${e.worker ? ` by ${e.worker}` : ""}`;
      words.push(e.reason);
      break;
    case "completed":
      what = `completed by ${e.worker} (attempt ${e.attempt})`;
      if (e.model || e.call_s) words.push(`${e.model || "model unknown"}, call ${(e.call_s || 0).toFixed(2)} s`);
      break;
    case "failed":
      what = `failed: ${e.reason}${e.worker ? ` on ${e.worker}` : ""}`;
      if (e.error) words.push(e.error);
      break;
    case "cancelled":
      what = `cancelled while ${e.was}`;
      if (e.reason) words.push(e.reason);
      break;
    default:
      what = status;
  }
  item.append(el("span", { text: clock(e.at_ms), cls: "when", title: new Date(e.at_ms).toISOString() }), " ", el("span", { text: what, cls: "what" }));
  for (const w of words) item.append(el("span", { text: w, cls: "words" }));
  return item;
}

function showView(view) {
  $("task-status").textContent = view.status;
  $("task-status").dataset.status = view.status;
  const meta = $("task-meta");
  meta.replaceChildren();
  fact(meta, "provider", view.provider);
  fact(meta, "updated", new Date(view.updated_at_ms).toLocaleString());
  if (view.submitted_at_ms) fact(meta, "submitted", new Date(view.submitted_at_ms).toLocaleString());
  fact(meta, "attempt", view.attempt || null);
  fact(meta, "worker", view.worker);
  fact(meta, "answered by", view.model);
  if (view.usage) fact(meta, "tokens in / out", `${int(view.usage.input_tokens)} / ${int(view.usage.output_tokens)}`);
  if (view.status === "completed") fact(meta, "cost", view.cost_usd === null || view.cost_usd === undefined ? "no price" : usd(view.cost_usd));
  if (view.call_s) fact(meta, "provider call", `${view.call_s.toFixed(2)} s`);
  if (view.submitted_at_ms && view.status === "completed") fact(meta, "end to end", `${((view.updated_at_ms - view.submitted_at_ms) / 1000).toFixed(2)} s`);
  if (view.status === "evicted") fact(meta, "evicted", view.error);
  else if (view.error) fact(meta, view.status === "failed" ? "error" : "last error", `${view.reason || "error"}: ${view.error}`);
  $("task-output").textContent =
    view.status === "completed" ? pretty(view.output)
    : view.status === "failed" || view.status === "cancelled" ? `(${view.status}: no output)`
    : view.status === "evicted" ? "(ended; its output is no longer kept)"
    : "(not finished yet)";
}

async function showActions(taskId, view, signal) {
  const actions = $("task-actions");
  actions.replaceChildren();
  if (!["completed", "failed", "cancelled", "evicted"].includes(view.status)) {
    const cancel = el("button", { text: "Cancel", cls: "secondary", title: "a queued task never runs; a running one is stopped" });
    cancel.type = "button";
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      if (await cancelTask(taskId, $("task-action-message"))) openStory(taskId, { keepMessage: true });
      else cancel.disabled = false;
    });
    actions.append(cancel);
    return;
  }
  if (view.status !== "failed") return;
  const letter = await api(`/v1/dlq/${encodeURIComponent(taskId)}`, signal);
  if (letter === null) return; // not (or no longer) dead-lettered
  const replay = el("button", { text: "Replay", title: "queue it again (same id, its next run)" });
  replay.type = "button";
  replay.addEventListener("click", async () => {
    replay.disabled = true;
    if (await replayTask(taskId, $("task-action-message"))) openStory(taskId, { keepMessage: true });
  });
  actions.append(replay);
}

async function openStory(taskId, { keepMessage = false } = {}) {
  story?.abort();
  story = new AbortController();
  const dialog = $("task-dialog");
  $("task-id").textContent = taskId;
  dialog.dataset.taskId = taskId;
  for (const id of ["task-meta", "task-facts", "task-input", "timeline", "task-actions"]) $(id).replaceChildren();
  if (!keepMessage) $("task-action-message").textContent = "";
  $("task-output").textContent = "";
  if (!dialog.open) dialog.showModal();
  await readStory(taskId, story.signal);
}

// The view and every event so far; read again when the feed brings one of the task's events while
// its story is open (so the timeline grows with no connection of its own).
async function readStory(taskId, signal) {
  try {
    const path = `/v1/tasks/${encodeURIComponent(taskId)}`;
    const [view, events] = await Promise.all([api(path, signal), api(`${path}/timeline`, signal)]);
    if (view === null || events === null) {
      $("task-output").textContent = "no such task on the bus (its events are older than the events stream keeps)";
      return;
    }
    if (signal.aborted) return;
    showView(view);
    const asked = events.find((e) => e.task);
    if (asked) {
      $("task-facts").replaceChildren();
      showAsked(asked.task);
    } else if (view.status === "evicted") {
      $("task-facts").replaceChildren();
      showAsked(view, { facts: false });
    }
    // the event's own kind ("moved.v1"), not the status it leaves the task in
    $("timeline").replaceChildren(...events.map((e) => timelineItem(String(e.type).split(".")[0], e)));
    $("task-dialog").dataset.status = view.status;
    await showActions(taskId, view, signal);
  } catch (error) {
    if (signal.aborted) return;
    if (error instanceof Unauthorized) return askForToken();
    $("task-action-message").textContent = `could not read the task: ${error.message}`;
  }
}

let storyPending = false;

function storyChanged(taskId) {
  const dialog = $("task-dialog");
  if (!dialog.open || dialog.dataset.taskId !== taskId || storyPending || !story) return;
  storyPending = true; // one read at a time, however many events come at once
  setTimeout(async () => {
    await readStory(taskId, story.signal);
    storyPending = false;
  }, 250);
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
      const [stats, workers, problems] = await Promise.all([
        api("/v1/stats", signal),
        api("/v1/workers", signal),
        api("/v1/problems", signal),
      ]);
      showStats(stats);
      showWorkers(workers);
      const dead = showProblems(problems);
      const hooks = (problems || []).find((p) => p.kind === "webhooks_failing")?.count ?? 0;
      if (round % USAGE_EVERY === 0) showUsage(await api("/v1/usage", signal));
      if (round === 0) await loadHistory(signal);
      else if (round % HISTORY_EVERY === 0) await updateHistory(signal);
      if (round % DLQ_EVERY === 0 || dead !== shownDeadLetters) await loadDeadLetters(signal, dead);
      if (hooks !== shownWebhookTrouble || (hooks && round % DLQ_EVERY === 0)) await loadWebhooks(signal, hooks);
      if (round % BATCHES_EVERY === 0) await loadBatches(signal);
      if (round % BATCHES_EVERY === 0) await loadSchedules(signal);
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

$("task-dialog").addEventListener("close", () => story?.abort());
$("dlq-purge-all").addEventListener("click", purgeAll);
window.addEventListener("resize", () => charts.resize());

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
