// One segment's session on the server: the page's own copy of the mask and of the prompts is the truth,
// as in CTSAM3DLib/remote.py (RemoteSession). Every prompt states the click count the session should have
// (a retried request is never applied twice); a session the server lost (expired, restarted: 404) is
// opened again and the prompts replayed; one that diverged (409) is brought back to the page's prompts.
import { Api, ServerRefusal } from './api.js'
import { API, applyUpdate, arrayDigest, bytesOf, compress, decodeUpdate, dtypeOf } from './wire.js'

const RECOVERIES = 4
const KIND_UNKNOWN_SESSION = 'unknown_session'
const KIND_CLICK_COUNT = 'click_count'
const KIND_UNKNOWN_IMAGE = 'unknown_image'

/** An array for the server: its wire dtype, shape [nz, ny, nx], bytes, and its name there. */
export class Upload {
  constructor(voxels, dims) {
    this.dtype = dtypeOf(voxels)
    this.shape = [dims[2], dims[1], dims[0]]
    this.bytes = bytesOf(voxels)
    this.digest = arrayDigest(this.dtype, this.shape, this.bytes)
  }
}

/** Sends an upload unless the server has it already. */
export async function ensureUploaded(api, upload) {
  if (await api.has(upload.digest)) return false
  const body = await compress(upload.bytes)
  await api.call('PUT', `${API}/images/${upload.digest}`, undefined, {
    body,
    headers: { 'X-Array-Dtype': upload.dtype, 'X-Array-Shape': upload.shape.join(','), 'Content-Type': 'application/octet-stream' },
  })
  return true
}

/** The centre of an LPS box: the positive click it adds (CTSAM3DLib.inputs.box_centre). */
export function boxCentre(corners_lps) {
  return [0, 1, 2].map((axis) => (corners_lps[0][axis] + corners_lps[1][axis]) / 2)
}

export class RemoteSegmentation {
  /**
   * `image`: {upload, geometry (LPS), dims [nx, ny, nz]}. `options`: session options (max_patches, ...).
   * `initialMask`: a Uint8Array of 0/1 of the image's size to start from, or null. `notice(text)` hears what
   * the session did by itself (a lost session opened again).
   */
  constructor(api, image, options, initialMask, notice = () => {}) {
    if (!(api instanceof Api)) throw new TypeError('api must be an Api')
    this.api = api
    this.image = image
    this.options = options
    this.notice = notice
    this.initial = initialMask ? new Upload(initialMask, image.dims) : null
    this.mask = initialMask ? initialMask.slice() : new Uint8Array(image.dims[0] * image.dims[1] * image.dims[2])
    this.prompts = []
    this.undone = []
    this.sessionId = null
    this.lastTiming = {}
    this.patchesOpen = 0
  }

  get canUndo() {
    return this.prompts.length > 0
  }

  get canRedo() {
    return this.undone.length > 0
  }

  async open() {
    const body = { image: this.image.upload.digest, ...this.image.geometry, options: this.options, ...this.initialPayload() }
    const uploads = this.initial ? [this.image.upload, this.initial] : [this.image.upload]
    const answer = await this.afterUploads(uploads, () => this.api.call('POST', `${API}/sessions`, body))
    this.sessionId = answer.session
    if (this.prompts.length) await this.synchronise(true)
    return answer
  }

  /** A positive or negative click at an LPS point; the update it made (null: nothing changed). */
  async click(point_lps, positive) {
    const update = await this.prompt('click', { point_lps, positive })
    this.prompts.push({ point_lps, positive })
    this.undone = []
    return update
  }

  /** A box (two opposite LPS corners): a positive click at its centre, the result clipped to it. */
  async box(corners_lps) {
    const update = await this.prompt('box', { corners_lps })
    this.prompts.push({ point_lps: boxCentre(corners_lps), positive: true, corners_lps })
    this.undone = []
    return update
  }

  async undo() {
    const answer = await this.onSession('POST', 'undo', { expected_clicks: this.prompts.length })
    this.undone.push(this.prompts.pop())
    return this.apply(answer)
  }

  /** Sends the last undone prompt again (the server keeps no redo of its own). */
  async redo() {
    const prompt = this.undone[this.undone.length - 1]
    const undone = this.undone.slice(0, -1)
    const update = prompt.corners_lps ? await this.box(prompt.corners_lps) : await this.click(prompt.point_lps, prompt.positive)
    this.undone = undone
    return update
  }

  /** Forgets every prompt; the mask is the initial mask again (or empty). */
  async reset() {
    await this.afterUploads(this.initial ? [this.initial] : [],
      () => this.onSession('POST', 'reset', this.initialPayload()))
    this.prompts = []
    this.undone = []
    this.mask = this.initial ? new Uint8Array(this.initial.bytes) : new Uint8Array(this.mask.length)
    this.patchesOpen = 0
  }

  async close() {
    if (this.sessionId === null) return
    const id = this.sessionId
    this.sessionId = null
    await this.api.send('DELETE', `${API}/sessions/${id}`).catch(() => {})
  }

  // --------------------------------------------------------------------- internals
  async prompt(action, payload) {
    return this.apply(await this.onSession('POST', action, { ...payload, expected_clicks: this.prompts.length }))
  }

  apply(answer) {
    const update = decodeUpdate(answer.update, this.image.dims)
    applyUpdate(this.mask, this.image.dims, update)
    this.lastTiming = answer.timing || {}
    this.patchesOpen = answer.patches_open || 0
    return update
  }

  async onSession(method, action, payload) {
    let recovery = null
    for (let attempt = 0; ; attempt++) {
      try {
        if (recovery === KIND_CLICK_COUNT) await this.synchronise(false)
        if (recovery === KIND_UNKNOWN_SESSION) {
          await this.open()
          this.notice(`The server no longer had this segment's session (expired or restarted): opened a new one ` +
            `and replayed ${this.prompts.length} prompt(s).`)
        }
        return await this.api.call(method, `${API}/sessions/${this.sessionId}/${action}`, payload)
      } catch (error) {
        const recoverable = error instanceof ServerRefusal && [KIND_UNKNOWN_SESSION, KIND_CLICK_COUNT].includes(error.kind)
        if (!recoverable || attempt === RECOVERIES) throw error
        recovery = error.kind
      }
    }
  }

  async afterUploads(uploads, request) {
    for (let attempt = 0; ; attempt++) {
      for (const upload of uploads) await ensureUploaded(this.api, upload)
      try {
        return await request()
      } catch (error) {
        // The server's image cache is shared by every user: it may have dropped ours meanwhile.
        if (!(error instanceof ServerRefusal) || error.kind !== KIND_UNKNOWN_IMAGE || attempt) throw error
      }
    }
  }

  /** Brings the server's session to the page's prompts, then takes its whole mask. */
  async synchronise(fresh) {
    const session = `${API}/sessions/${this.sessionId}`
    if (this.prompts.some((prompt) => prompt.corners_lps)) {
      if (!fresh) {
        await this.afterUploads(this.initial ? [this.initial] : [],
          () => this.api.call('POST', `${session}/reset`, this.initialPayload()))
      }
      for (const [count, prompt] of this.prompts.entries()) {
        if (prompt.corners_lps) {
          await this.api.call('POST', `${session}/box`, { corners_lps: prompt.corners_lps, expected_clicks: count })
        } else {
          await this.api.call('POST', `${session}/click`, { point_lps: prompt.point_lps, positive: prompt.positive, expected_clicks: count })
        }
      }
    } else {
      const clicks = this.prompts.map((prompt) => [prompt.point_lps, prompt.positive])
      let reached = -1
      while (reached < clicks.length) {
        const answer = await this.api.call('PUT', `${session}/clicks`, { clicks })
        const previous = reached
        reached = answer.clicks
        if (reached <= previous) throw new Error(`the server stopped at ${reached} of the ${clicks.length} clicks sent`)
      }
    }
    const answer = await this.api.call('GET', `${session}/mask`)
    const whole = decodeUpdate(answer.update, this.image.dims)
    this.mask = whole ? whole.mask.slice() : new Uint8Array(this.mask.length)
    this.patchesOpen = answer.patches_open || 0
  }

  initialPayload() {
    return this.initial ? { initial_mask: this.initial.digest } : { initial_mask: null }
  }
}
