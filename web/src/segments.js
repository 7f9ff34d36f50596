// Segments: each with its name, colour, visibility and opacity, its own session on the server and its own
// overlay in the viewer.
import { indexOfLPS } from './geometry.js'
import { RemoteSegmentation } from './session.js'

const PALETTE = [[60, 140, 240], [250, 190, 40], [170, 90, 230], [40, 200, 190], [240, 140, 60], [240, 120, 200]]

export class Segment {
  constructor(name, colour, session, overlay) {
    this.name = name
    this.colour = colour
    this.session = session
    this.overlay = overlay
    this.visible = true
    this.opacity = 0.5
  }

  get hex() {
    return `#${this.colour.map((c) => c.toString(16).padStart(2, '0')).join('')}`
  }
}

export class Segments {
  /** `image`: {upload, geometry, dims}; `viewer`: the Viewer; `options()`: the session options now. */
  constructor(api, image, viewer, options, notice) {
    this.api = api
    this.image = image
    this.viewer = viewer
    this.options = options
    this.notice = notice
    this.list = []
    this.selected = -1
    this.made = 0
  }

  get current() {
    return this.list[this.selected] || null
  }

  /** The selected segment; an Error saying what to do when there is none. */
  get target() {
    if (!this.current) throw new Error('No segment: press "New segment" first.')
    return this.current
  }

  /** A new segment with its own session (from `initialMask`, a 0/1 Uint8Array, when given), selected. */
  async add(initialMask = null, name = null) {
    const colour = PALETTE[this.made % PALETTE.length]
    this.made += 1
    const session = new RemoteSegmentation(this.api, this.image, this.options(), initialMask, this.notice)
    const opened = await session.open()
    if (opened.warnings && opened.warnings.length) this.notice(`The server says: ${opened.warnings.join(' ')}`)
    const segment = new Segment(name || `Segment ${this.made}`, colour, session, this.viewer.addOverlay(colour))
    this.list.push(segment)
    this.selected = this.list.length - 1
    this.show(segment)
    return segment
  }

  async remove(segment) {
    const index = this.list.indexOf(segment)
    this.list.splice(index, 1)
    this.viewer.removeOverlay(segment.overlay)
    this.selected = Math.min(this.selected, this.list.length - 1)
    await segment.session.close()
    this.showPrompts()
  }

  /** Shows a segment's mask as it is now, and the selected segment's prompts. */
  show(segment) {
    this.viewer.showMask(segment.overlay, segment.session.mask, segment.visible, segment.opacity)
    this.showPrompts()
  }

  showPrompts() {
    const segment = this.current
    const geometry = this.image.geometry
    const prompts = (segment ? segment.session.prompts : []).map((prompt) => ({
      index: indexOfLPS(geometry, prompt.point_lps),
      positive: prompt.positive,
      boxIndices: prompt.corners_lps ? prompt.corners_lps.map((corner) => indexOfLPS(geometry, corner)) : undefined,
    }))
    this.viewer.showPrompts(prompts, geometry.spacing)
  }

  /** A click at an LPS point as a prompt of the selected segment. */
  async click(point_lps, positive) {
    const segment = this.target
    await segment.session.click(point_lps, positive)
    this.show(segment)
  }

  async box(corners_lps) {
    const segment = this.target
    await segment.session.box(corners_lps)
    this.show(segment)
  }

  async undo() {
    const segment = this.target
    await segment.session.undo()
    this.show(segment)
  }

  async redo() {
    const segment = this.target
    await segment.session.redo()
    this.show(segment)
  }

  async reset() {
    const segment = this.target
    await segment.session.reset()
    this.show(segment)
  }

  async closeAll() {
    for (const segment of this.list) {
      this.viewer.removeOverlay(segment.overlay)
      await segment.session.close()
    }
    this.list = []
    this.selected = -1
  }
}
