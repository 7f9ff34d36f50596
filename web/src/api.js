// HTTP to the server that served this page (same origin): the bearer token, JSON in and out, refusals as
// ServerRefusal, lost connections retried as CTSAM3DLib/remote.py does (a growing backoff for about 16 s,
// longer than a server takes to restart).

const TOKEN_KEY = 'ctsam3d.token'
const BACKOFF_S = 0.25
const MAX_BACKOFF_S = 2.0
const RETRIES = 10

/** A refusal of the server: its status, its kind (protocol.KIND_*), its one-line message. */
export class ServerRefusal extends Error {
  constructor(status, kind, message, details = {}) {
    super(message)
    this.status = status
    this.kind = kind
    this.details = details
  }
}

/** The server could not be reached (after the retries). */
export class ServerUnreachable extends Error {}

/** What a user reads for a refusal or a lost connection: what happened and what to do. */
export function explain(error) {
  if (!(error instanceof ServerRefusal)) return error.message
  const said = error.message
  switch (error.status) {
    case 401: return `The server refused the token (401): ${said}`
    case 404: return `Not found on the server (404): ${said}`
    case 409: return `The server's session and this page disagreed (409): ${said}`
    case 413: return `Too large for this server (413): ${said}`
    case 429: return `The server's queue for this segment is full (429): ${said}. Wait for the clicks under way, then try again.`
    case 503: return `The server is busy (503): ${said}${error.details.retryAfter ? ` Try again in ${error.details.retryAfter} s.` : ''}`
    default: return `The server answered ${error.status} (${error.kind || 'error'}): ${said}`
  }
}

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000))

export class Api {
  /** `askToken()` resolves to a token typed by the user (called when the server refuses the one kept);
   * `onRetry(text)` hears, while the connection is lost, what the page is doing about it ('' once it is back). */
  constructor(askToken, onRetry = () => {}) {
    this.askToken = askToken
    this.onRetry = onRetry
  }

  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || ''
  }

  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value)
    else sessionStorage.removeItem(TOKEN_KEY)
  }

  /** Whether the server takes this tab's token (or needs none): asks the user until it does. */
  async authorize() {
    for (;;) {
      const response = await this.send('HEAD', `/v1/images/${'0'.repeat(64)}`)
      if (response.status !== 401) return
      this.token = await this.askToken(this.token ? 'The server refused this token; type it again.' : '')
    }
  }

  /** One request; its Response (any status) once the server answers. */
  async send(method, path, { body, headers = {} } = {}) {
    const sent = { ...headers }
    if (this.token) sent.Authorization = `Bearer ${this.token}`
    let problem
    for (let attempt = 0; attempt <= RETRIES; attempt++) {
      if (attempt) {
        this.onRetry(`the connection to the server was lost (${problem.message}): trying again, ${attempt} of ${RETRIES}…`)
        await sleep(Math.min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
      }
      try {
        const response = await fetch(path, { method, body, headers: sent, cache: 'no-store', credentials: 'same-origin' })
        if (attempt) this.onRetry('')
        return response
      } catch (error) {
        problem = error
      }
    }
    throw new ServerUnreachable(`Cannot reach the CT-SAM3D server at ${location.origin} (${problem.message}; ` +
      `tried ${RETRIES + 1} times). Is it still running? Nothing on this page was lost: once the server is ` +
      'back, do again what failed.')
  }

  /** A request whose answer is JSON: the answer, or a ServerRefusal; a refused token is asked again once. */
  async call(method, path, payload, { body, headers } = {}) {
    for (let attempt = 0; ; attempt++) {
      const sent = payload === undefined
        ? { body, headers }
        : { body: JSON.stringify(payload), headers: { 'Content-Type': 'application/json' } }
      const response = await this.send(method, path, sent)
      const text = await response.text()
      let answer = {}
      try {
        answer = text ? JSON.parse(text) : {}
      } catch {
        answer = { error: text.slice(0, 200) }
      }
      if (response.ok) return answer
      const refusal = new ServerRefusal(response.status, answer.kind, answer.error || `HTTP ${response.status}`,
        { ...answer, retryAfter: response.headers.get('Retry-After') })
      if (response.status !== 401 || attempt) throw refusal
      this.token = await this.askToken(`The server refused the request: ${refusal.message}`)
    }
  }

  /** Whether the server holds an array of that name. */
  async has(digest) {
    const response = await this.send('HEAD', `/v1/images/${digest}`)
    if (response.status === 200 || response.status === 404) return response.status === 200
    throw new ServerRefusal(response.status, undefined, `HEAD of an image answered ${response.status}`)
  }
}
