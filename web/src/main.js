// The page: wires the viewer, the segments and their sessions, the files, and the messages together.
import { Api, explain } from './api.js'
import { dicomSegmentation } from './dicomseg.js'
import { download, labelmapOf, niftiLabelmap, niftiOfDicomSeries, stemOf, unopenable } from './files.js'
import { lpsBoxAround, lpsGeometryOfAffine, lpsOfIndex } from './geometry.js'
import { Segments } from './segments.js'
import { Upload } from './session.js'
import { arrayDigest } from './wire.js'
import { Viewer } from './viewer.js'

const $ = (id) => document.getElementById(id)

class Page {
  constructor() {
    this.api = new Api((problem) => this.askToken(problem), (text) => {
      this.connection = text
      if (text) $('busy-text').textContent = text
    })
    this.connection = ''
    this.viewer = new Viewer($('viewer'), {
      onPoint: (index, shift) => this.run('click', () => this.segments.click(this.lps(index), shift === this.negative)),
      onBox: (corners) => this.run('box', () => this.segments.box(lpsBoxAround(corners.map((index) => this.lps(index))))),
    })
    this.segments = null
    this.negative = false
    this.stem = ''
    this.dicomFiles = null
    this.work = Promise.resolve()
    this.pending = 0
    this.lastError = ''
  }

  /** The LPS point of a continuous voxel index of the open CT. */
  lps(index) {
    return lpsOfIndex(this.segments.image.geometry, index)
  }

  async start() {
    await this.viewer.attach()
    this.bind()
    this.refresh()
    await this.api.authorize().catch((error) => this.fail(error))
  }

  askToken(problem) {
    $('token-problem').textContent = problem
    $('token').value = ''
    $('token-dialog').showModal()
    return new Promise((resolve) => {
      $('token-form').onsubmit = (event) => {
        event.preventDefault()
        $('token-dialog').close()
        resolve($('token').value.trim())
      }
    })
  }

  bind() {
    $('open').addEventListener('change', () => this.openFile($('open').files[0]))
    $('open-dicom').addEventListener('change', () => this.openDicomSeries([...$('open-dicom').files]))
    $('mode-click').onclick = () => this.setMode('click')
    $('mode-box').onclick = () => this.setMode('box')
    $('negative').onclick = () => this.setNegative(!this.negative)
    $('undo').onclick = () => this.run('undo', () => this.segments.undo())
    $('redo').onclick = () => this.run('redo', () => this.segments.redo())
    $('reset').onclick = () => this.run('reset', () => this.segments.reset())
    $('add-segment').onclick = () => this.run('new segment', () => this.segments.add())
    $('start-from').onclick = () => this.run('start from this segment', () => {
      const from = this.segments.target
      return this.segments.add(from.session.mask.slice(), `${from.name} (corrected)`)
    })
    $('save').onclick = () => this.run('save', () => this.save())
    $('save-seg').onclick = () => this.run('save as DICOM SEG', () => this.saveDicomSegmentation())
    $('zoom-in').onclick = () => this.viewer.zoom(1.25)
    $('zoom-out').onclick = () => this.viewer.zoom(0.8)
    for (const button of document.querySelectorAll('[data-preset]')) button.onclick = () => this.viewer.setPreset(button.dataset.preset)
    for (const button of document.querySelectorAll('[data-layout]')) button.onclick = () => this.viewer.setLayout(button.dataset.layout)
    document.addEventListener('keydown', (event) => this.key(event))
  }

  key(event) {
    if (event.target instanceof HTMLInputElement || !this.segments) return
    const control = event.ctrlKey || event.metaKey
    if (control && event.key.toLowerCase() === 'z') this.run('undo', () => this.segments.undo())
    else if (control && event.key.toLowerCase() === 'y') this.run('redo', () => this.segments.redo())
    else if (control) return
    else if (event.key === 'n') this.setNegative(!this.negative)
    else if (event.key === 'b') this.setMode('box')
    else if (event.key === 'c') this.setMode('click')
    else if (event.key === '+' || event.key === '=') this.viewer.zoom(1.25)
    else if (event.key === '-') this.viewer.zoom(0.8)
    else return
    event.preventDefault()
  }

  setMode(mode) {
    this.viewer.setMode(mode)
    $('mode-click').classList.toggle('on', mode === 'click')
    $('mode-box').classList.toggle('on', mode === 'box')
  }

  setNegative(on) {
    this.negative = on
    $('negative').classList.toggle('on', on)
  }

  options() {
    const maxPatches = Number.parseInt($('max-patches').value, 10)
    return Number.isFinite(maxPatches) ? { max_patches: maxPatches } : {}
  }

  /** Runs the page's actions one after another (a click waits for the one before it), with the busy
   * indicator while one runs and a message when one fails. */
  run(what, action) {
    if (!this.segments && what !== 'open') {
      this.say('Open a CT first.', true)
      return Promise.resolve()
    }
    this.pending += 1
    this.refresh()
    const started = performance.now()
    const timer = setInterval(() => {
      $('busy-text').textContent = this.connection ||
        `${what}: ${((performance.now() - started) / 1000).toFixed(0)} s (a click may open several patches)`
    }, 500)
    $('busy-text').textContent = `${what}…`
    this.work = this.work.then(async () => {
      // Cleared before, not after: what the action itself says (a session opened again) stays up.
      this.say('')
      this.lastError = ''
      try {
        await action()
      } catch (error) {
        this.fail(error)
      } finally {
        clearInterval(timer)
        this.connection = ''
        this.pending -= 1
        this.refresh()
      }
    })
    return this.work
  }

  fail(error) {
    console.error(error)
    this.lastError = explain(error)
    this.say(this.lastError, true)
  }

  say(text, problem = false) {
    $('message').hidden = !text
    $('message').textContent = text
    $('message').classList.toggle('info', !problem)
  }

  async openFile(file) {
    if (!file) return
    const problem = unopenable(file)
    if (problem) {
      this.say(problem, true)
      return
    }
    await this.run('open', () => this.show(file, file.name))
  }

  async openDicomSeries(files) {
    if (!files.length) return
    const folder = (files[0].webkitRelativePath || files[0].name).split('/')[0]
    await this.run('open', async () => {
      $('busy-text').textContent = `converting the DICOM series in ${folder} (${files.length} files)…`
      await this.show(await niftiOfDicomSeries(files), folder, files)
    })
  }

  /** Shows a CT file (NIfTI or NRRD) and opens its first segment; `name` (the file's, or the DICOM folder's)
   * is shown and names what is saved; `dicomFiles`: the series it was converted from, for a DICOM SEG. */
  async show(file, name, dicomFiles = null) {
    if (this.segments) await this.segments.closeAll()
    this.segments = null
    const base = await this.viewer.open(file)
    const dims = this.viewer.dims
    const geometry = lpsGeometryOfAffine(this.viewer.affineRAS)
    $('busy-text').textContent = 'uploading the CT (once: the server keeps it)…'
    const image = { upload: new Upload(this.viewer.voxels(), dims), geometry, dims }
    this.stem = stemOf(name)
    this.dicomFiles = dicomFiles
    this.segments = new Segments(this.api, image, this.viewer, () => this.options(), (text) => this.say(text))
    await this.segments.add()
    $('image-info').textContent = `${name}: ${dims.join(' × ')} voxels, ` +
      `${geometry.spacing.map((s) => s.toFixed(2)).join(' × ')} mm (${base.hdr.datatypeCode === 16 ? 'float32' : image.upload.dtype})`
  }

  async save() {
    const { dims } = this.segments.image
    const labels = labelmapOf(this.segments.list.map((segment) => segment.session.mask), dims[0] * dims[1] * dims[2])
    const bytes = await niftiLabelmap(this.viewer.base, labels)
    download(bytes, `${this.stem}-segments.nii.gz`)
  }

  async saveDicomSegmentation() {
    const { geometry, dims } = this.segments.image
    const segments = this.segments.list.map((segment) => ({ name: segment.name, mask: segment.session.mask }))
    $('busy-text').textContent = `writing the DICOM SEG over the ${this.dicomFiles.length} files of the series…`
    download(await dicomSegmentation(this.dicomFiles, geometry, dims, segments), `${this.stem}-segments.seg.dcm`)
  }

  refresh() {
    const segments = this.segments
    const current = segments && segments.current
    $('busy').hidden = this.pending === 0
    for (const id of ['undo', 'redo', 'reset', 'start-from', 'save', 'add-segment']) $(id).disabled = !segments
    $('save-seg').disabled = !segments || !this.dicomFiles
    if (current) {
      $('undo').disabled = !current.session.canUndo
      $('redo').disabled = !current.session.canRedo
      const timing = current.session.lastTiming
      $('status').textContent = `${current.name}: ${current.session.prompts.length} prompt(s), ` +
        `${current.session.patchesOpen} patch(es) open` +
        (timing.total !== undefined ? `, last prompt ${Number(timing.total).toFixed(2)} s on the server ` +
          `(${timing.patches_decoded} patch(es) decoded)` : '')
    }
    this.listSegments()
  }

  listSegments() {
    const list = $('segments')
    list.replaceChildren()
    if (!this.segments) return
    this.segments.list.forEach((segment, index) => {
      const item = document.createElement('li')
      item.classList.toggle('selected', index === this.segments.selected)
      const swatch = document.createElement('span')
      swatch.className = 'swatch'
      swatch.style.background = segment.hex
      const name = document.createElement('input')
      name.type = 'text'
      name.value = segment.name
      name.onchange = () => { segment.name = name.value }
      const visible = document.createElement('input')
      visible.type = 'checkbox'
      visible.checked = segment.visible
      visible.title = 'Visible'
      visible.onchange = () => { segment.visible = visible.checked; this.segments.show(segment) }
      const opacity = document.createElement('input')
      opacity.type = 'range'
      opacity.min = '0'
      opacity.max = '1'
      opacity.step = '0.05'
      opacity.value = String(segment.opacity)
      opacity.title = 'Opacity'
      opacity.oninput = () => { segment.opacity = Number(opacity.value); this.segments.show(segment) }
      const remove = document.createElement('button')
      remove.textContent = '×'
      remove.title = 'Delete this segment'
      remove.onclick = (event) => { event.stopPropagation(); this.run('delete', () => this.segments.remove(segment)) }
      item.onclick = (event) => {
        if (event.target !== item && event.target !== swatch) return
        this.segments.selected = index
        this.segments.showPrompts()
        this.refresh()
      }
      item.append(swatch, name, visible, opacity, remove)
      list.append(item)
    })
  }
}

const page = new Page()

// What the browser tests read of the page: its state and its overlays, never written through this.
window.ctsam3d = {
  idle: () => page.work,
  error: () => page.lastError,
  message: () => $('message').textContent,
  state: () => page.segments && {
    geometry: page.segments.image.geometry,
    dims: page.segments.image.dims,
    image: page.segments.image.upload.digest,
    selected: page.segments.selected,
    segments: page.segments.list.map((segment) => ({
      name: segment.name,
      session: segment.session.sessionId,
      prompts: segment.session.prompts,
      mask: arrayDigest('uint8', [segment.session.image.dims[2], segment.session.image.dims[1], segment.session.image.dims[0]], segment.session.mask),
      overlay: arrayDigest('uint8', [segment.session.image.dims[2], segment.session.image.dims[1], segment.session.image.dims[0]], segment.overlay.img),
      overlayVoxels: segment.overlay.img.reduce((sum, value) => sum + (value ? 1 : 0), 0),
    })),
  },
  canvasPositionOfIndex: (index) => page.viewer.canvasPositionOfIndex(index),
  showIndex: (index) => page.viewer.showIndex(index),
  location: () => page.viewer.location,
}

page.start().catch((error) => page.fail(error))
