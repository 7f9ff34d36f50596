// The segments of a CT opened from a DICOM series, saved as DICOM SEG: dcmjs (the DICOM toolkit of the OHIF and
// dcmjs-org projects) derives the SEG from the series' own instances, so that it references them by their
// UIDs and a PACS, 3D Slicer or OHIF shows it over that series. Each frame is a source slice, filled from the
// segment's mask through the geometry: every pixel's LPS point, from the slice's Image Position and Orientation
// (Patient) and Pixel Spacing, taken to the converted volume's voxel there.
import { data, derivations, log, normalizers } from 'dcmjs'
import { indexOfLPS } from './geometry.js'

const ALGORITHM = 'CT-SAM3D'
/** "Tissue" / "Organ" (SNOMED CT) as the segments' category and type: the page does not know the anatomy. */
const CATEGORY = { CodeValue: '85756007', CodingSchemeDesignator: 'SCT', CodeMeaning: 'Tissue' }
const TYPE = { CodeValue: '113343008', CodingSchemeDesignator: 'SCT', CodeMeaning: 'Organ' }

const validation = log.getLogger('validation.dcmjs')
// dcmjs sets its log level when it loads, and its logger (loglevel) stores that in localStorage; the page
// keeps nothing beyond the tab.
localStorage.removeItem('loglevel')

/** The series' image instances among `files` (other files of the folder are passed over), naturalized. */
async function readInstances(files) {
  const instances = []
  const level = validation.getLevel()
  // dcmjs's validation logs an error for the pixel data of every implicit-VR file (VR "ox"), which it then
  // reads right, as OW; what goes wrong throws.
  validation.setLevel('silent', false)
  try {
    for (const file of files) {
      let parsed
      try {
        parsed = data.DicomMessage.readFile(await file.arrayBuffer())
      } catch {
        continue // not DICOM: dcm2niix passed it over as well
      }
      const dataset = data.DicomMetaDictionary.naturalizeDataset(parsed.dict)
      dataset._meta = data.DicomMetaDictionary.namifyDataset(parsed.meta)
      if (dataset.Rows && dataset.ImagePositionPatient && dataset.ImageOrientationPatient) instances.push(dataset)
    }
  } finally {
    validation.setLevel(level, false)
  }
  if (!instances.length) throw new Error('The folder no longer holds the DICOM series the CT was opened from.')
  return instances
}

/** A frame's binary mask (rows x columns, columns fastest) of `mask` (the converted volume's voxels), or null
 * where the segment does not touch it. */
function frameOf(mask, geometry, dims, position, rowDirection, columnDirection, spacing, rows, columns) {
  // DICOM: the row direction is that of increasing column index; PixelSpacing is (between rows, between
  // columns). The voxel index is affine in (row, column): its start and its steps are all it takes.
  const start = indexOfLPS(geometry, position)
  const step = (direction, millimetres) => indexOfLPS(geometry, position.map((value, axis) => value + direction[axis] * millimetres))
    .map((value, axis) => value - start[axis])
  const perColumn = step(rowDirection, spacing[1])
  const perRow = step(columnDirection, spacing[0])
  const frame = new Uint8Array(rows * columns)
  let filled = false
  for (let row = 0; row < rows; row++) {
    for (let column = 0; column < columns; column++) {
      const i = Math.round(start[0] + perRow[0] * row + perColumn[0] * column)
      const j = Math.round(start[1] + perRow[1] * row + perColumn[1] * column)
      const k = Math.round(start[2] + perRow[2] * row + perColumn[2] * column)
      if (i < 0 || j < 0 || k < 0 || i >= dims[0] || j >= dims[1] || k >= dims[2]) continue
      if (mask[i + dims[0] * (j + dims[1] * k)]) {
        frame[row * columns + column] = 1
        filled = true
      }
    }
  }
  return filled ? frame : null
}

/**
 * The bytes of a DICOM SEG of `segments` ([{name, mask}], masks on the converted volume of `geometry` (LPS) and
 * `dims`) over the DICOM series in `files`. A segment gets the frames of the slices it touches; an empty one is
 * left out, and a SEG with none is refused.
 */
export async function dicomSegmentation(files, geometry, dims, segments) {
  const multiframe = normalizers.Normalizer.normalizeToDataset(await readInstances(files))
  const shared = multiframe.SharedFunctionalGroupsSequence
  const orientation = shared.PlaneOrientationSequence.ImageOrientationPatient.map(Number)
  const spacing = shared.PixelMeasuresSequence.PixelSpacing.map(Number)
  const { Rows: rows, Columns: columns } = multiframe
  const positions = multiframe.PerFrameFunctionalGroupsSequence.map(
    (group) => group.PlanePositionSequence.ImagePositionPatient.map(Number))
  const filled = segments.map((segment) => positions.map((position) => frameOf(
    segment.mask, geometry, dims, position, orientation.slice(0, 3), orientation.slice(3), spacing, rows, columns)))
  const frameCount = filled.flat().filter(Boolean).length
  if (!frameCount) throw new Error('Every segment is empty: there is nothing to save as DICOM SEG.')
  const seg = new derivations.Segmentation([multiframe])
  seg.setNumberOfFrames(frameCount)
  segments.forEach((segment, index) => {
    const frames = filled[index]
    const numbers = frames.flatMap((frame, at) => (frame ? [at + 1] : []))
    if (!numbers.length) return
    const pixels = new Uint8Array(rows * columns * numbers.length)
    numbers.forEach((number, at) => pixels.set(frames[number - 1], at * rows * columns))
    seg.addSegment({
      SegmentLabel: segment.name,
      SegmentAlgorithmType: 'SEMIAUTOMATIC',
      SegmentAlgorithmName: ALGORITHM,
      SegmentedPropertyCategoryCodeSequence: CATEGORY,
      SegmentedPropertyTypeCodeSequence: TYPE,
    }, pixels, numbers)
  })
  seg.bitPackPixelData()
  Object.assign(seg.dataset, { SeriesDescription: 'CT-SAM3D segments', Manufacturer: ALGORITHM })
  return new Uint8Array(data.datasetToDict(seg.dataset).write())
}
