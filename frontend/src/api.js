// The plugin's JSON routes. Paths are relative: the tab's document has <base href="plugin/gradients/">, so they reach
// /data/plugin/gradients/... also under --path_prefix and /experiment/<id>/.

export class ApiError extends Error {
  constructor(route, status, detail) {
    super(status ? `${route}: HTTP ${status}${detail ? ` – ${detail}` : ""}` : `${route}: ${detail}`);
    this.route = route;
    this.status = status;
    this.detail = detail;
  }
}

export async function getJson(route, params = {}, signal = undefined) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) query.set(key, String(value));
  }
  const qs = query.toString();
  const url = new URL(qs ? `${route}?${qs}` : route, document.baseURI);
  let response;
  try {
    response = await fetch(url, { signal, headers: { Accept: "application/json" } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(route, 0, "TensorBoard did not answer (is it still running?)");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(route, response.status, body && body.error ? body.error : response.statusText);
  if (body === null) throw new ApiError(route, response.status, "the answer was not JSON");
  return body;
}

export function isAbort(err) {
  return err && err.name === "AbortError";
}

/** A slot for one in-flight request: starting a new one aborts the previous, so late answers never overwrite. */
export class Slot {
  constructor() {
    this.controller = null;
  }

  async run(fn) {
    if (this.controller) this.controller.abort();
    const controller = new AbortController();
    this.controller = controller;
    try {
      return await fn(controller.signal);
    } finally {
      if (this.controller === controller) this.controller = null;
    }
  }

  abort() {
    if (this.controller) this.controller.abort();
  }
}
