// The viewer: NiiVue (WebGL2) showing the CT in axial, coronal and sagittal slices and a 3D rendering, one
// overlay per segment, the prompts as markers. Mouse: a left click prompts (Shift: negative) in click mode,
// a left drag draws a box in box mode; a right drag sets the window, a middle drag pans, the wheel scrolls
// through slices. Points leave this module as continuous voxel indices (i, j, k) of the stored grid, never
// as NiiVue's millimetres: for an oblique CT NiiVue's frac-to-mm conversion (frac2mmOrtho) is the nearest
// axis-aligned approximation, not the scan's true geometry, which geometry.js applies instead.
import { DRAG_MODE, MULTIPLANAR_TYPE, NVImage, Niivue, SHOW_RENDER, SLICE_TYPE } from '@niivue/niivue'

export const PRESETS = {
  soft: { name: 'Soft tissue', window: 400, level: 40 },
  lung: { name: 'Lung', window: 1500, level: -600 },
  bone: { name: 'Bone', window: 1800, level: 400 },
}

export const LAYOUTS = {
  multi: SLICE_TYPE.MULTIPLANAR,
  axial: SLICE_TYPE.AXIAL,
  coronal: SLICE_TYPE.CORONAL,
  sagittal: SLICE_TYPE.SAGITTAL,
  render: SLICE_TYPE.RENDER,
}

const MARKER_COLOURS = { positive: [40, 220, 80], negative: [240, 60, 60], box: [250, 210, 40] }
const MARKER_LABEL = { positive: 1, negative: 2, box: 3 }
const MARKER_RADIUS_MM = 8
const CLICK_SLOP_PX = 4
const UINT8 = 2

/** The world axis (0 R, 1 A, 2 S) across a 2D view: axial views look along S, coronal along A, sagittal along R. */
const DEPTH_AXIS = { [SLICE_TYPE.AXIAL]: 2, [SLICE_TYPE.CORONAL]: 1, [SLICE_TYPE.SAGITTAL]: 0 }

function labelColourmap(rgb) {
  return { R: [0, rgb[0]], G: [0, rgb[1]], B: [0, rgb[2]], A: [0, 255], I: [0, 1] }
}

export class Viewer {
  /** `onPoint(index, negative)` hears a prompt click; `onBox(corners)` a box drawn (its 8 corners as indices). */
  constructor(canvas, { onPoint, onBox }) {
    this.canvas = canvas
    this.onPoint = onPoint
    this.onBox = onBox
    this.mode = 'click'
    this.nv = new Niivue({
      backColor: [0.05, 0.05, 0.07, 1],
      show3Dcrosshair: true,
      isSliceMM: true,
      crosshairColor: [0.35, 0.75, 1.0, 0.6],
      isRadiologicalConvention: true,
      multiplanarShowRender: SHOW_RENDER.ALWAYS,
      multiplanarLayout: MULTIPLANAR_TYPE.GRID,
      dragAndDropEnabled: false,
      loadingText: 'Open a CT (NIfTI or NRRD)',
    })
    this.nv.opts.mouseEventConfig = {
      leftButton: { primary: DRAG_MODE.crosshair, withShift: DRAG_MODE.crosshair, withCtrl: DRAG_MODE.crosshair },
      rightButton: DRAG_MODE.windowing,
      centerButton: DRAG_MODE.pan,
    }
    this.base = null
    this.markers = null
    this.down = null
    this.location = null
    this.nv.onDragRelease = (params) => this.dragged(params)
    // What NiiVue itself reports under the crosshair: the CT's value there (shown in the status line).
    this.nv.onLocationChange = (location) => {
      this.location = { value: location.values.length ? location.values[0].value : null, text: location.string }
    }
    canvas.addEventListener('pointerdown', (event) => {
      this.down = { x: event.offsetX, y: event.offsetY, button: event.button }
    })
    canvas.addEventListener('pointerup', (event) => this.released(event))
  }

  async attach() {
    await this.nv.attachToCanvas(this.canvas)
    this.nv.setSliceType(SLICE_TYPE.MULTIPLANAR)
    // Nearest-neighbour: voxels show as they are, and labels (markers, masks) never blend into other labels.
    this.nv.setInterpolation(true)
  }

  /** Opens a CT file (NIfTI or NRRD), replacing what was shown; the NVImage. */
  async open(file) {
    const image = await NVImage.loadFromFile({ file, name: file.name, colormap: 'gray' })
    if (!image.hdr || image.hdr.dims[0] < 3 || (image.hdr.dims[4] || 1) > 1) {
      throw new Error(`${file.name} is not a 3D scalar image`)
    }
    for (const volume of [...this.nv.volumes]) this.nv.removeVolume(volume)
    this.nv.addVolume(image)
    this.base = image
    this.markers = this.addOverlay(null)
    this.setPreset('soft')
    return image
  }

  /** The CT's size [nx, ny, nz] (x fastest in memory). */
  get dims() {
    return [1, 2, 3].map((axis) => this.base.hdr.dims[axis])
  }

  /** The CT's voxel-to-RAS matrix (4 rows of 4). */
  get affineRAS() {
    return this.base.hdr.affine
  }

  /** The CT's voxels in Hounsfield units: the stored ones, or float32 where the file scales them. */
  voxels() {
    const { scl_slope: slope, scl_inter: intercept } = this.base.hdr
    const scaled = Number.isFinite(slope) && slope !== 0 && (slope !== 1 || (Number.isFinite(intercept) && intercept !== 0))
    if (!scaled) return this.base.img
    const values = new Float32Array(this.base.img.length)
    for (let i = 0; i < values.length; i++) values[i] = this.base.img[i] * slope + (intercept || 0)
    return values
  }

  /** A new label overlay on the CT's grid (uint8, 0 transparent, 1 in `rgb`; null: the prompt markers). */
  addOverlay(rgb) {
    const overlay = this.base.clone()
    overlay.img = new Uint8Array(this.base.img.length)
    Object.assign(overlay.hdr, { datatypeCode: UINT8, numBitsPerVoxel: 8, scl_slope: 1, scl_inter: 0, cal_min: 0, cal_max: 1 })
    overlay.name = rgb ? 'segment' : 'prompts'
    overlay.setColormapLabel(rgb ? labelColourmap(rgb) : {
      R: [0, ...Object.values(MARKER_COLOURS).map((c) => c[0])],
      G: [0, ...Object.values(MARKER_COLOURS).map((c) => c[1])],
      B: [0, ...Object.values(MARKER_COLOURS).map((c) => c[2])],
      A: [0, 255, 255, 255],
      I: [0, 1, 2, 3],
    })
    overlay.cal_min = 0
    overlay.cal_max = rgb ? 1 : 3
    overlay.opacity = rgb ? 0.5 : 1
    this.nv.addVolume(overlay)
    if (this.markers) this.raiseMarkers()
    return overlay
  }

  raiseMarkers() {
    this.nv.setVolume(this.markers, this.nv.volumes.length - 1)
  }

  removeOverlay(overlay) {
    this.nv.removeVolume(overlay)
  }

  /** Shows `mask` (0/1, the CT's size) in an overlay. */
  showMask(overlay, mask, visible, opacity) {
    overlay.img.set(mask)
    overlay.opacity = visible ? opacity : 0
    this.nv.updateGLVolume()
  }

  /** Draws the prompts as markers: balls at clicks (green positive, red negative), box edges in yellow.
   * `prompts`: [{index: [i, j, k] continuous voxel index, positive, boxIndices?: [[i, j, k], [i, j, k]]}]. */
  showPrompts(prompts, spacing) {
    const marks = this.markers.img
    marks.fill(0)
    const [nx, ny, nz] = this.dims
    const put = (i, j, k, label) => {
      if (i >= 0 && j >= 0 && k >= 0 && i < nx && j < ny && k < nz) marks[(k * ny + j) * nx + i] = label
    }
    for (const prompt of prompts) {
      const radius = spacing.map((s) => Math.max(1, Math.round(MARKER_RADIUS_MM / s)))
      const centre = prompt.index.map(Math.round)
      const label = prompt.boxIndices ? MARKER_LABEL.box : prompt.positive ? MARKER_LABEL.positive : MARKER_LABEL.negative
      for (let dk = -radius[2]; dk <= radius[2]; dk++) {
        for (let dj = -radius[1]; dj <= radius[1]; dj++) {
          for (let di = -radius[0]; di <= radius[0]; di++) {
            if ((di / radius[0]) ** 2 + (dj / radius[1]) ** 2 + (dk / radius[2]) ** 2 <= 1) put(centre[0] + di, centre[1] + dj, centre[2] + dk, label)
          }
        }
      }
      if (prompt.boxIndices) this.drawBoxEdges(prompt.boxIndices, (i, j, k) => put(i, j, k, MARKER_LABEL.box))
    }
    this.nv.updateGLVolume()
  }

  drawBoxEdges(corners, put) {
    const low = [0, 1, 2].map((a) => Math.round(Math.min(corners[0][a], corners[1][a])))
    const high = [0, 1, 2].map((a) => Math.round(Math.max(corners[0][a], corners[1][a])))
    for (let axis = 0; axis < 3; axis++) {
      const [u, v] = [0, 1, 2].filter((a) => a !== axis)
      for (const cu of [low[u], high[u]]) {
        for (const cv of [low[v], high[v]]) {
          for (let t = low[axis]; t <= high[axis]; t++) {
            const point = []
            point[axis] = t
            point[u] = cu
            point[v] = cv
            put(...point)
          }
        }
      }
    }
  }

  setPreset(name) {
    const { window, level } = PRESETS[name]
    this.base.cal_min = level - window / 2
    this.base.cal_max = level + window / 2
    this.nv.updateGLVolume()
  }

  setLayout(name) {
    this.nv.setSliceType(LAYOUTS[name])
  }

  zoom(factor) {
    this.nv.scene.pan2Dxyzmm[3] = Math.min(8, Math.max(0.5, this.nv.scene.pan2Dxyzmm[3] * factor))
    this.nv.drawScene()
  }

  /** 'click' (a left click prompts) or 'box' (a left drag draws a box). */
  setMode(mode) {
    this.mode = mode
    this.nv.opts.mouseEventConfig.leftButton.primary = mode === 'box' ? DRAG_MODE.roiSelection : DRAG_MODE.crosshair
  }

  /** The continuous stored voxel index (i, j, k) under a canvas position (CSS pixels), or null outside the
   * 2D slices. */
  indexAt(x, y) {
    const dpr = this.nv.uiData.dpr || 1
    const frac = this.nv.canvasPos2frac([x * dpr, y * dpr])
    return frac[0] < 0 ? null : this.indexOfFrac(frac)
  }

  /** NiiVue's frac (of its RAS-reoriented voxel grid: RAS axis r is stored axis |permRAS[r]| - 1, reversed
   * where permRAS[r] < 0) as a continuous stored voxel index. */
  indexOfFrac(frac) {
    const perm = this.base.permRAS
    const dims = this.dims
    const index = [0, 0, 0]
    for (let axis = 0; axis < 3; axis++) {
      const stored = Math.abs(perm[axis]) - 1
      const voxel = frac[axis] * dims[stored] - 0.5
      index[stored] = perm[axis] > 0 ? voxel : dims[stored] - 1 - voxel
    }
    return index
  }

  fracOfIndex(index) {
    const perm = this.base.permRAS
    const dims = this.dims
    const frac = [0, 0, 0]
    for (let axis = 0; axis < 3; axis++) {
      const stored = Math.abs(perm[axis]) - 1
      const voxel = perm[axis] > 0 ? index[stored] : dims[stored] - 1 - index[stored]
      frac[axis] = (voxel + 0.5) / dims[stored]
    }
    return frac
  }

  /** The canvas position (CSS pixels) of a stored voxel index in the first 2D view showing it, or null. */
  canvasPositionOfIndex(index) {
    const position = this.nv.frac2canvasPos(this.fracOfIndex(index))
    if (!position) return null
    const dpr = this.nv.uiData.dpr || 1
    return [position[0] / dpr, position[1] / dpr]
  }

  /** Moves the crosshair, and so the slices shown, to a stored voxel index. */
  showIndex(index) {
    this.nv.scene.crosshairPos = this.fracOfIndex(index)
    this.nv.drawScene()
  }

  released(event) {
    const down = this.down
    this.down = null
    if (!this.base || !down || down.button !== 0 || event.button !== 0 || this.mode !== 'click') return
    if (Math.hypot(event.offsetX - down.x, event.offsetY - down.y) > CLICK_SLOP_PX) return
    const index = this.indexAt(event.offsetX, event.offsetY)
    if (index) this.onPoint(index, event.shiftKey)
  }

  /** A box drawn on a 2D view: as deep across the view as the mean of its width and height, centred on
   * the slice it was drawn on; handed on as its 8 corners (stored voxel indices). */
  dragged(params) {
    if (this.mode !== 'box' || !(params.axCorSag in DEPTH_AXIS)) return
    const depthAxis = DEPTH_AXIS[params.axCorSag]
    const spacing = [1, 2, 3].map((axis) => this.base.pixDimsRAS[axis])
    const start = Array.from(params.fracStart)
    const end = Array.from(params.fracEnd)
    const dimsRAS = [1, 2, 3].map((axis) => this.base.dimsRAS[axis])
    const sides_mm = [0, 1, 2].filter((axis) => axis !== depthAxis)
      .map((axis) => Math.abs(end[axis] - start[axis]) * dimsRAS[axis] * spacing[axis])
    if (Math.min(...sides_mm) <= 0) return
    const halfDepthFrac = (sides_mm[0] + sides_mm[1]) / 4 / spacing[depthAxis] / dimsRAS[depthAxis]
    const middle = (start[depthAxis] + end[depthAxis]) / 2
    start[depthAxis] = middle - halfDepthFrac
    end[depthAxis] = middle + halfDepthFrac
    const corners = []
    for (const x of [start[0], end[0]]) {
      for (const y of [start[1], end[1]]) {
        for (const z of [start[2], end[2]]) corners.push(this.indexOfFrac([x, y, z]))
      }
    }
    this.onBox(corners)
  }
}
