// World coordinates. NIfTI files and NiiVue speak RAS (+x towards the patient's right, +y anterior,
// +z superior); CTSAM3DLib and the server speak LPS (+x left, +y posterior, +z superior), as DICOM and ITK
// do. The two differ in the sign of x and y. The page converts once, the CT's voxel-to-RAS affine into the
// server's LPS geometry; every point it sends is then made from a voxel index in LPS. Names say which space
// they hold: affineRAS, point_lps.

/**
 * The geometry the server takes (ITK's: origin, spacing, direction, all LPS) of an image whose voxel
 * index (i, j, k) maps to RAS millimetres by `affineRAS` (4 rows of 4, as NiiVue's `hdr.affine`).
 * ITK's direction is row-major: direction[3 * row + column].
 */
export function lpsGeometryOfAffine(affineRAS) {
  const flip = [-1, -1, 1]
  const matrix_lps = [0, 1, 2].map((row) => [0, 1, 2].map((column) => flip[row] * affineRAS[row][column]))
  const origin = [0, 1, 2].map((row) => flip[row] * affineRAS[row][3])
  const spacing = [0, 1, 2].map((column) => Math.hypot(...[0, 1, 2].map((row) => matrix_lps[row][column])))
  const direction = []
  for (let row = 0; row < 3; row++) {
    for (let column = 0; column < 3; column++) direction.push(matrix_lps[row][column] / spacing[column])
  }
  return { origin, spacing, direction }
}

/** The LPS point at a continuous voxel index (i, j, k) of an image of that geometry. */
export function lpsOfIndex(geometry, index) {
  const { origin, spacing, direction } = geometry
  return [0, 1, 2].map((row) =>
    origin[row] + [0, 1, 2].reduce((sum, column) => sum + direction[3 * row + column] * spacing[column] * index[column], 0))
}

/** The continuous voxel index (i, j, k) of an LPS point (the inverse of lpsOfIndex: the direction is orthonormal). */
export function indexOfLPS(geometry, point_lps) {
  const { origin, spacing, direction } = geometry
  const offset = [0, 1, 2].map((row) => point_lps[row] - origin[row])
  return [0, 1, 2].map((column) =>
    [0, 1, 2].reduce((sum, row) => sum + direction[3 * row + column] * offset[row], 0) / spacing[column])
}

/** The axis-aligned LPS box (its two opposite corners) around LPS points. */
export function lpsBoxAround(points_lps) {
  return [[0, 1, 2].map((axis) => Math.min(...points_lps.map((point) => point[axis]))),
    [0, 1, 2].map((axis) => Math.max(...points_lps.map((point) => point[axis])))]
}
