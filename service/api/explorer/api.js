// Calls to the amserve API. URLs are relative to this page (…/explorer/ → …/v1/…), so the page works
// behind a proxy that serves the app under a root path.

const KEY_STORAGE = "amserve-api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** An answer in the service's error envelope: {"error": {"code", "message", "field"}}. */
class ApiError extends Error {
  constructor(status, code, message, field) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

async function call(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(`../${path}`, location.href), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const answer = parsed(text);
  if (!response.ok) {
    const error = answer?.error ?? {};
    throw new ApiError(response.status, error.code ?? "error", error.message ?? text.slice(0, 200), error.field);
  }
  return answer;
}

function parsed(text) {
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;  // not JSON (a proxy's error page, say): the caller reports the text
  }
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const put = (path, body) => call("PUT", path, body);
