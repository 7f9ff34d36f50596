// The wire format of `ctsam3d serve` (CTSAM3DLib/protocol.py): arrays travel as zlib-compressed raw
// little-endian bytes in C order (z, y, x) with their dtype and shape stated beside them, and are named by
// the SHA-256 of a header line and those bytes, so that an image already on the server is not sent again.
import { sha256 } from '@noble/hashes/sha2.js'
import { unzlibSync } from 'fflate'

export const API = '/v1'

const DTYPES = new Map([
  [Uint8Array, 'uint8'], [Int8Array, 'int8'], [Uint16Array, 'uint16'], [Int16Array, 'int16'],
  [Uint32Array, 'uint32'], [Int32Array, 'int32'], [Float32Array, 'float32'], [Float64Array, 'float64'],
  [BigUint64Array, 'uint64'], [BigInt64Array, 'int64'],
])

/** The wire dtype of a typed array's voxels ("int16", ...); an Error for one the server cannot take. */
export function dtypeOf(voxels) {
  const dtype = DTYPES.get(voxels.constructor)
  if (!dtype) throw new Error(`voxels of type ${voxels.constructor.name} cannot be sent to the server`)
  return dtype
}

/** The bytes of a typed array, without a copy (every browser this page runs on is little-endian). */
export function bytesOf(voxels) {
  return new Uint8Array(voxels.buffer, voxels.byteOffset, voxels.byteLength)
}

const DIGEST_CHUNK = 1 << 24

/** The name of an array on the wire: protocol.array_digest of its dtype, shape [nz, ny, nx] and bytes. */
export function arrayDigest(dtype, shape, bytes) {
  const [nz, ny, nx] = shape
  const hash = sha256.create()
  hash.update(new TextEncoder().encode(`ctsam3d-array-v1 ${dtype} ${nz} ${ny} ${nx}\n`))
  for (let start = 0; start < bytes.length; start += DIGEST_CHUNK) {
    hash.update(bytes.subarray(start, Math.min(start + DIGEST_CHUNK, bytes.length)))
  }
  return Array.from(hash.digest(), (byte) => byte.toString(16).padStart(2, '0')).join('')
}

/** Bytes compressed in the zlib format (the Compression Streams "deflate" format is zlib's, RFC 1950). */
export async function compress(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream('deflate'))
  return new Uint8Array(await new Response(stream).arrayBuffer())
}

/** The bytes of a base64 string. */
export function fromBase64(text) {
  const binary = atob(text)
  const bytes = new Uint8Array(binary.length)
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i)
  return bytes
}

/**
 * A mask update of an answer ({start: [x, y, z], shape: [nz, ny, nx], dtype, data}) as
 * {start, shape, mask: Uint8Array in (z, y, x) order}, checked to fit a volume of `dims` [nx, ny, nz];
 * null when it is empty.
 */
export function decodeUpdate(update, dims) {
  const { start, shape, dtype, data } = update
  if (dtype !== 'uint8' || start.length !== 3 || shape.length !== 3) {
    throw new Error(`malformed mask update: start ${start}, shape ${shape}, dtype ${dtype}`)
  }
  if (Math.min(...shape) === 0) return null
  const size = [shape[2], shape[1], shape[0]]
  if (start.some((value, axis) => value < 0 || value + size[axis] > dims[axis])) {
    throw new Error(`the mask update's box (start ${start}, shape ${shape}) leaves the image ${dims}`)
  }
  const mask = unzlibSync(fromBase64(data))
  if (mask.length !== shape[0] * shape[1] * shape[2]) {
    throw new Error(`the mask update holds ${mask.length} voxels, not the ${shape.join('x')} it states`)
  }
  return { start, shape, mask }
}

/** Writes a decoded update into a whole mask of `dims` [nx, ny, nz] (x fastest, as NIfTI stores voxels). */
export function applyUpdate(whole, dims, update) {
  if (!update) return
  const [x0, y0, z0] = update.start
  const [nz, ny, nx] = update.shape
  for (let z = 0; z < nz; z++) {
    for (let y = 0; y < ny; y++) {
      const from = (z * ny + y) * nx
      const to = ((z0 + z) * dims[1] + (y0 + y)) * dims[0] + x0
      whole.set(update.mask.subarray(from, from + nx), to)
    }
  }
}
