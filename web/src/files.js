// Files: what the page can open (a DICOM series through dcm2niix), and the segments saved as a NIfTI
// labelmap in the CT's geometry.
import { Dcm2niix } from '@niivue/dcm2niix'

export const OPENABLE = ['.nii', '.nii.gz', '.nrrd']

/** A CT file's name without its extension (one of OPENABLE), to name what is saved from it. */
export function stemOf(name) {
  const suffix = OPENABLE.find((extension) => name.toLowerCase().endsWith(extension))
  return suffix ? name.slice(0, -suffix.length) : name
}

/** Why a file cannot be opened as a CT here ('' when it can). */
export function unopenable(file) {
  const name = file.name.toLowerCase()
  if (OPENABLE.some((suffix) => name.endsWith(suffix))) return ''
  if (name.endsWith('.dcm') || !name.includes('.')) {
    return `${file.name}: a DICOM file; open its whole series with "Open a DICOM series (folder)"`
  }
  return `${file.name}: open a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, data attached) CT`
}

let converter = null

/** What dcm2niix's exit codes mean (its console/nii_dicom_batch.h), for the message a user reads. */
const DCM2NIIX_FAILURES = {
  2: 'no DICOM image in it',
  4: 'a DICOM file in it is corrupt',
  8: 'only part of it could be converted',
  10: 'its volumes are incomplete (missing slices)',
}

/** The CT of a DICOM series folder (its files, as a folder input gives them) as a NIfTI File, converted in
 * the browser by dcm2niix (WebAssembly, in a worker): slices placed by their Image Position (Patient), the
 * rescale kept as the NIfTI's scaling, a gantry tilt corrected. A folder with no series or several is
 * refused with what it holds. */
export async function niftiOfDicomSeries(files) {
  if (!files.length) throw new Error('The folder holds no files.')
  if (!converter) {
    const starting = new Dcm2niix()
    await starting.init()
    converter = starting
  }
  const converted = await converter.input(files).bids('n').gzip('n').run().catch((error) => {
    const code = Number((/exit code (\d+)/.exec(error.message) || [])[1])
    throw new Error(`That folder (${files.length} files) could not be opened as a DICOM series: ` +
      `${DCM2NIIX_FAILURES[code] || error.message}.`)
  })
  const volumes = converted.filter((file) => /\.nii(\.gz)?$/i.test(file.name))
  if (!volumes.length) throw new Error(`No DICOM image series among the ${files.length} files of that folder.`)
  if (volumes.length > 1) {
    throw new Error(`That folder holds ${volumes.length} image series (${volumes.map((file) => file.name).join(', ')}); ` +
      'choose a folder with one CT series.')
  }
  return volumes[0]
}

/** One labelmap (uint8, 0 background, segment n has label n + 1, later segments over earlier ones) of the
 * visible and hidden segments' masks. */
export function labelmapOf(masks, voxelCount) {
  const labels = new Uint8Array(voxelCount)
  masks.forEach((mask, index) => {
    for (let i = 0; i < voxelCount; i++) if (mask[i]) labels[i] = index + 1
  })
  return labels
}

/** A gzip-compressed NIfTI of `labels` with the header (geometry) of the CT `base` (an NVImage). */
export async function niftiLabelmap(base, labels) {
  const image = base.clone()
  image.img = labels
  Object.assign(image.hdr, { datatypeCode: 2, numBitsPerVoxel: 8, scl_slope: 1, scl_inter: 0, cal_min: 0, cal_max: 0 })
  image.hdr.descrip = 'CT-SAM3D segments'
  return image.saveToUint8Array('segments.nii.gz')
}

/** Hands bytes to the browser as a download named `name`. */
export function download(bytes, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }))
  const link = document.createElement('a')
  link.href = url
  link.download = name
  document.body.append(link)
  link.click()
  link.remove()
  setTimeout(() => URL.revokeObjectURL(url), 10_000)
}
