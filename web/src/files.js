// Files: what the page can open, and the segments saved as a NIfTI labelmap in the CT's geometry.

export const OPENABLE = ['.nii', '.nii.gz', '.nrrd']

/** Why a file cannot be opened as a CT here ('' when it can). */
export function unopenable(file) {
  const name = file.name.toLowerCase()
  if (OPENABLE.some((suffix) => name.endsWith(suffix))) return ''
  if (name.endsWith('.dcm') || !name.includes('.')) {
    return `${file.name}: DICOM series are not opened by this page yet; convert the series to NIfTI first ` +
      '(for example with dcm2niix, or in 3D Slicer), then open the .nii.gz'
  }
  return `${file.name}: open a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, data attached) CT`
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
